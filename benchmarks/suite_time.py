"""Time the test suite: `make test-fast` and `make test` (issue 19's targets on 2 cores: under
60 s and under 3 minutes), wall-clock and CPU seconds, with the CPU model, core count and load.

CPU seconds (user + system of every process the target starts) move less than wall time on a
machine shared with other work, so they are printed too. With --baseline REV the same targets
also run on that commit (exported to a temporary folder, same virtual environment), right
before this tree's, and the ratios are printed: compare runs made under the same conditions.
Each tree's suite is collected once before the timed runs, so both start with Python's byte-code
cache written (the Makefile keeps it on; a fresh clone's first run compiles everything).

    .venv/bin/python benchmarks/suite_time.py [--targets test-fast test] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from devtools.machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "suite_time.json"


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_target(target: str, folder: Path) -> dict:
    """Run `make TARGET` in `folder`; its wall and CPU seconds and pytest's summary line of each
    session it ran (a revision that ran the suite twice, once per backend, has two), with the
    tests that failed. Make ignores errors (-i): a failing test in a first session would otherwise
    leave the second out of the timing."""
    cpu_before, started = children_cpu_seconds(), time.monotonic()
    environment = {**os.environ, "PYTEST_ADDOPTS": "-rfE"}  # the failed tests listed by name
    done = subprocess.run(["make", "-s", "-i", target], cwd=folder, capture_output=True, text=True, env=environment)
    wall, cpu = time.monotonic() - started, children_cpu_seconds() - cpu_before
    lines = (done.stdout + done.stderr).splitlines()
    summaries = [line.strip("= ") for line in lines if re.search(r"\d+ (passed|failed)", line) and " in " in line]
    failed = [line.split(" - ")[0] for line in lines if line.startswith(("FAILED ", "ERROR "))]
    if not summaries or any(re.search(r"\d+ (failed|errors?)\b", line) for line in summaries):
        # make -i goes on after lint, a usage error or a lost worker: no summary, or one with
        # failures, marks the run as not all green whatever the lines above caught.
        failed.append(f"make {target}: {len(summaries)} pytest summaries, not all green")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "sessions": summaries, "failed": failed}


def reference_loop_seconds() -> float:
    """Seconds this machine takes for a fixed pure-Python loop (best of three): the host's speed
    varies between runs (by a third on one day), so each run says how fast it was."""
    timings = []
    for _ in range(3):
        started, total = time.perf_counter(), 0
        for number in range(10_000_000):
            total += number
        timings.append(time.perf_counter() - started)
    return round(min(timings), 2)


def warm_up(folder: Path) -> None:
    """Collect the suite once: the project's modules and pytest's rewritten tests compiled and cached."""
    collect = [str(folder / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "--collect-only", "-n", "0"]
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(collect, cwd=folder, capture_output=True, env=environment, check=False)


def export_revision(revision: str, into: Path) -> Path:
    """A checkout of `revision` in `into`, with this tree's virtual environment linked in. A
    clone, not an archive: the sandbox tests expect the source folder to hold `.git`."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    # TemporaryDirectory makes `into` 0700: the sandbox tests' child runs as `nobody`, which must
    # read the source folder, as it can a checkout's.
    into.chmod(0o755)
    subprocess.run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(ROOT), str(into)], check=True)
    subprocess.run(["git", "-C", str(into), "checkout", "--quiet", "--detach", commit], check=True)
    (into / ".venv").symlink_to((ROOT / ".venv").resolve())
    # The clone's files are newer than the shared environment's stamp: without this its `make`
    # would build the environment again over the link.
    (into / ".venv" / ".installed").touch()
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=["test-fast", "test"])
    parser.add_argument("--baseline", help="a git revision to time first, for ratios")
    args = parser.parse_args(argv)
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average_before": os.getloadavg(),
        "reference_loop_s_before": reference_loop_seconds(),
        "postgresql": bool(os.environ.get("TEST_DATABASE_URL")),
        "runs": {},
    }
    speed = f"reference loop {result['reference_loop_s_before']} s"
    print(f"{result['cpu']}, {result['cores']} cores, load {result['load_average_before'][0]:.1f}, {speed}")
    with tempfile.TemporaryDirectory() as scratch:
        trees = {"this tree": ROOT}
        if args.baseline:
            trees = {f"baseline {args.baseline}": export_revision(args.baseline, Path(scratch)), **trees}
        for folder in trees.values():
            warm_up(folder)
        for target in args.targets:
            for name, folder in trees.items():
                run = time_target(target, folder)
                result["runs"].setdefault(target, {})[name] = run
                figures = f"{run['wall_s']:8.1f} s wall {run['cpu_s']:8.1f} s CPU"
                print(f"make {target:10} {name:24} {figures}  {'; '.join(run['sessions'])}")
            if args.baseline:
                base, new = result["runs"][target][f"baseline {args.baseline}"], result["runs"][target]["this tree"]
                ratios = {kind: round(new[f"{kind}_s"] / base[f"{kind}_s"], 2) for kind in ("wall", "cpu")}
                result["runs"][target]["ratio_to_baseline"] = ratios
                print(f"make {target:10} ratio to the baseline: {ratios['wall']} wall, {ratios['cpu']} CPU")
    result["load_average_after"] = os.getloadavg()
    result["reference_loop_s_after"] = reference_loop_seconds()
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"reference loop after: {result['reference_loop_s_after']} s; written to {RESULTS.relative_to(ROOT)}")
    failed = [t for t, runs in result["runs"].items() for r in runs.values() if isinstance(r, dict) and r.get("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
