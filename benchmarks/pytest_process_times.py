"""A pytest plugin that records where each process of a test run (the controller and every
pytest-xdist worker) spends its time: the clock at its configuration, the end of its collection,
its first test, the end of its session and its unconfiguration, and the collections and seconds
of Python's cycle collector per generation, with the objects it still tracks at the end. Each
process appends one JSON line to PROCESS_TIMES_LOG.

    PROCESS_TIMES_LOG=/tmp/times.jsonl PYTHONPATH=benchmarks \\
        .venv/bin/python -m pytest -p pytest_process_times -n 2 --dist loadfile --no-loadscope-reorder ...

    .venv/bin/python benchmarks/pytest_process_times.py /tmp/times.jsonl   # the table of a log

docs/testing.md ("the fifth round") reads it against a commit without the conftest's gc.freeze().
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time

_clock: dict[str, float] = {}
_seconds = [0.0, 0.0, 0.0]
_collections = [0, 0, 0]
_started: list[float] = []


def _on_collection(phase: str, info: dict) -> None:
    if phase == "start":
        _started[:] = [time.perf_counter()]
    elif _started:
        _seconds[info["generation"]] += time.perf_counter() - _started[0]
        _collections[info["generation"]] += 1


def pytest_configure(config) -> None:
    _clock["configure"] = time.time()
    gc.callbacks.append(_on_collection)


def pytest_collection_finish(session) -> None:
    _clock["collected"] = time.time()


def pytest_runtest_logstart(nodeid, location) -> None:
    _clock.setdefault("first_test", time.time())


def pytest_sessionfinish(session) -> None:
    _clock["session_finished"] = time.time()


def pytest_unconfigure(config) -> None:
    _clock["unconfigure"] = time.time()
    line = {
        "process": os.environ.get("PYTEST_XDIST_WORKER", "controller"),
        "clock": _clock,
        "gc_collections": _collections,
        "gc_seconds": [round(value, 2) for value in _seconds],
        "tracked_objects": len(gc.get_objects()),
    }
    if "PROCESS_TIMES_LOG" not in os.environ:  # loaded without a log to write: nothing to do
        return
    with open(os.environ["PROCESS_TIMES_LOG"], "a") as log:
        log.write(json.dumps(line) + "\n")


def print_table(path: str) -> None:
    """Each process's events, in seconds from the controller's configuration, and its collector."""
    with open(path) as log:
        lines = [json.loads(line) for line in log]
    start = min(line["clock"]["configure"] for line in lines)
    events = ("configure", "collected", "first_test", "session_finished", "unconfigure")
    print(f"{'process':12}" + "".join(f"{name:>18}" for name in events) + "   collector s (full collections)")
    for line in sorted(lines, key=lambda line: line["process"]):
        at = [line["clock"].get(name) for name in events]
        cells = "".join(f"{moment - start:18.2f}" if moment else f"{'-':>18}" for moment in at)
        gc_cells = f"{sum(line['gc_seconds']):.1f} ({line['gc_collections'][2]})"
        print(f"{line['process']:12}{cells}   {gc_cells}")


if __name__ == "__main__":
    print_table(sys.argv[1])
