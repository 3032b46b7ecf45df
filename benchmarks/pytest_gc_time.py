"""A pytest plugin that times Python's cycle collector in each process of a test run (the
controller and every pytest-xdist worker): collections and seconds per generation, and the
objects it still tracks at the end. Each process appends one JSON line to GC_TIME_LOG.

    GC_TIME_LOG=/tmp/gc.jsonl PYTHONPATH=benchmarks .venv/bin/python -m pytest -p pytest_gc_time -n 2 ...

docs/testing.md ("the fifth round") reads it against a commit without the conftest's gc.freeze().
"""

from __future__ import annotations

import gc
import json
import os
import time

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
    gc.callbacks.append(_on_collection)


def pytest_sessionfinish(session) -> None:
    line = {
        "process": os.environ.get("PYTEST_XDIST_WORKER", "controller"),
        "collections": _collections,
        "seconds": [round(value, 2) for value in _seconds],
        "tracked_objects": len(gc.get_objects()),
    }
    with open(os.environ["GC_TIME_LOG"], "a") as log:
        log.write(json.dumps(line) + "\n")
