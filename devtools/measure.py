"""Timing and memory readings the benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def p50_ms(call: Callable[[], object], repeats: int) -> float:
    """The median time of `call` over `repeats` calls after one warm-up call, in ms (to the µs)."""
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return round(1000 * statistics.median(times), 3)


def smaps_rollup_mb(pid: int | str = "self") -> dict[str, float]:
    """A process's /proc/PID/smaps_rollup in MB by field: Rss (every resident page, shared
    libraries included), Pss (shared pages split between the processes mapping them),
    Private_Clean, Private_Dirty ... An OSError when the process is gone."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return fields
