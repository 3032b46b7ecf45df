"""Password hashing cost: how long one login's hash check takes at several scrypt work factors.

The login page checks one scrypt hash per attempt (a dummy one for unknown names), so this is the
CPU a login costs, and what an attacker with a stolen database pays per guess. OWASP recommends
scrypt N=2^17, r=8, p=1 (128 MiB per hash); werkzeug's default is N=2^15 (32 MiB).

    python benchmarks/password_hash.py [--repeats 7] [--out benchmarks/results/password_hash.json]

Prints the CPU model and, per work factor, the median and slowest of `--repeats` checks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from werkzeug.security import check_password_hash, generate_password_hash

from devtools.machine import cpu_model

METHODS = ("scrypt:32768:8:1", "scrypt:65536:8:1", "scrypt:131072:8:1")


def time_check(method: str, repeats: int) -> list[float]:
    """Milliseconds of each of `repeats` checks of a correct password against a `method` hash."""
    stored = generate_password_hash("correct horse battery", method=method)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        assert check_password_hash(stored, "correct horse battery")
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {"cpu": cpu_model(), "repeats": args.repeats, "methods": {}}
    print(f"cpu: {results['cpu']}")
    for method in METHODS:
        times = time_check(method, args.repeats)
        figures = {"median_ms": round(statistics.median(times), 1), "max_ms": round(max(times), 1)}
        results["methods"][method] = figures
        print(f"{method:<20} median {figures['median_ms']:7.1f} ms   slowest {figures['max_ms']:7.1f} ms")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
