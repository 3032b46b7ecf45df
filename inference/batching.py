"""Dynamic batching: concurrent requests' images collected into one model call.

As TensorFlow Serving's batching does, a request's images wait at most `max_wait_ms` for others
arriving at the same time; the batch runs as soon as it holds `max_batch` images or the wait ends.
Each request gets back exactly its own rows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np


@dataclass
class _Job:
    images: np.ndarray
    future: Future


class MicroBatcher:
    """Runs `infer` (uint8 batch in, one row per image out) on batches gathered across threads."""

    def __init__(
        self,
        infer: Callable[[np.ndarray], np.ndarray],
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000
        self.on_batch = on_batch or (lambda size: None)
        self._jobs: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="micro-batcher", daemon=True)
        self._thread.start()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Rows for `images`, computed in a shared batch; blocks until they are ready."""
        if len(images) >= self.max_batch:
            return self._infer_counted(images)  # already a full batch: no reason to wait
        job = _Job(images, Future())
        with self._cond:
            queued = not self._closed
            if queued:
                self._jobs.append(job)
                self._cond.notify()
        if not queued:
            return self._infer_counted(images)  # closed: answer directly
        return job.future.result()

    def close(self) -> None:
        """Stop the batching thread once the queued jobs are answered; later calls run directly."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _infer_counted(self, images: np.ndarray) -> np.ndarray:
        self.on_batch(len(images))
        return self.infer(images)

    def _take_batch(self) -> list[_Job]:
        """Wait for a first job, then for company until the batch is full or the wait is over."""
        with self._cond:
            while not self._jobs and not self._closed:
                self._cond.wait()
            deadline = None
            while not self._closed:
                queued = sum(len(job.images) for job in self._jobs)
                if queued >= self.max_batch:
                    break
                if deadline is None:
                    deadline = time.monotonic() + self.max_wait_s
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            taken, size = [], 0
            while self._jobs and (not taken or size + len(self._jobs[0].images) <= self.max_batch):
                job = self._jobs.pop(0)
                taken.append(job)
                size += len(job.images)
            return taken

    def _run(self) -> None:
        while True:
            jobs = self._take_batch()
            if not jobs:
                if self._closed:
                    return
                continue
            try:
                rows = self._infer_counted(np.concatenate([job.images for job in jobs]))
            except Exception as exc:  # every waiting request must hear about the failure
                for job in jobs:
                    job.future.set_exception(exc)
                continue
            start = 0
            for job in jobs:
                job.future.set_result(rows[start : start + len(job.images)])
                start += len(job.images)
