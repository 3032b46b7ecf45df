"""Champion and challenger at serving time, per process: which version answers a request (the
canary's share, by a stable hash of the upload), the second model's scoring off the response
path (shadow, and the champion behind a canary) on a bounded queue. The Models page's part is
web/rollout_pages.py.

The plan (mode, challenger, share, sample) is read on the registry poll, beside the slots'
assignments, so every worker follows a change within the poll interval and no request reads the
rollout state. The background thread writes the second model's answers to `model_outputs`, the
latency and failures of both to `rollout_observations`, and runs the canary's checks
(rollout_state.maybe_check): nothing of it is on the response path.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flask import Flask, current_app
from prometheus_client import Counter, Histogram
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

import model_store
import serving
from database import db
from model_store import ModelCalibration, ModelVersion
from prediction_history import ModelOutput, RolloutObservation
from predictor import ImageError
from rollout import checks as rollout_checks
from rollout import state as rollout_state
from serving import CHAMPION, Classification, DecodedUpload, LoadedModel, SlotKey, Upload
from web.errors import WebError

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
DEFAULTS = {"ROLLOUT_QUEUE_SIZE": 64, "ROLLOUT_TIMEOUT_SECONDS": 5.0}
# The most queued jobs one transaction records (web/rollout.OffPathWorker._drain).
DRAIN_MAX = 32

ANSWERS = Counter(
    "imgcls_rollout_answers_total",
    "Answers while a challenger exists, by version, slot, path (answered or scored off the path) and decision.",
    ["model_id", "name", "version", "role", "path", "decision"],
)
LATENCY = Histogram(
    "imgcls_rollout_latency_seconds",
    "Request time for the version that answered, or model time for the one scoring off the path.",
    ["model_id", "name", "version", "role", "path"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
ERRORS = Counter(
    "imgcls_rollout_errors_total", "Model failures by version and slot.", ["model_id", "name", "version", "role"]
)
JOBS = Counter(
    "imgcls_rollout_offpath_jobs_total",
    "Off-path scoring jobs: done, dropped (queue full), stale (waited past the timeout), failed.",
    ["outcome"],
)


def _labels(loaded: LoadedModel, role: str) -> dict:
    return {"model_id": str(loaded.id), "name": loaded.name, "version": str(loaded.version), "role": role}


@dataclass(frozen=True)
class Route:
    """Who answers a request, and who scores it off the path (None: nobody)."""

    answering: LoadedModel
    role: str
    companion: LoadedModel | None = None
    companion_role: str | None = None


@dataclass
class Job:
    """Off-path work for one answered request."""

    decoded: list[DecodedUpload]
    prediction_ids: list[int | None]
    answered: LoadedModel
    answered_role: str
    latency_ms: float
    error: bool
    companion: LoadedModel | None
    companion_role: str | None
    queued: float = field(default_factory=time.monotonic)


def slot_key(model_id: int) -> SlotKey | None:
    """The slot key of a version by id (as serving.registry_assignments gives the champion's)."""
    row = db.session.execute(
        select(ModelVersion.id, ModelVersion.sha256, ModelCalibration.created_at)
        .outerjoin(ModelCalibration, ModelCalibration.model_id == ModelVersion.id)
        .where(ModelVersion.id == model_id)
    ).first()
    return tuple(row) if row else None


class OffPathWorker:
    """A bounded queue and one daemon thread per process: scores the second model, records the
    observations and runs the canary's checks. A full queue drops the job and counts it."""

    def __init__(self, app: Flask, size: int, timeout_s: float):
        self._app = app
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=size)
        self.timeout_s = timeout_s
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {"done": 0, "dropped": 0, "stale": 0, "failed": 0}

    def submit(self, job: Job) -> bool:
        """Queue the job without waiting; False (counted) when the queue is full."""
        self._ensure_thread()
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._count("dropped")
            return False
        return True

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until every queued job is done (tests, benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        JOBS.labels(outcome).inc()

    def _ensure_thread(self) -> None:
        # After a fork the parent's thread is not the child's: each worker process starts its own.
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="rollout-off-path", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            jobs = self._drain()
            try:
                with self._app.app_context():
                    self._process(jobs)
            except Exception:  # the thread outlives failed jobs; the answers were already sent
                log.exception("off-path scoring failed")
                for _ in jobs:
                    self._count("failed")
            finally:
                for _ in jobs:
                    self._queue.task_done()

    def _drain(self) -> list[Job]:
        """The next job, and those queued behind it up to DRAIN_MAX: recorded in one transaction,
        they take the database's write lock once, not once each, from the requests' own writes."""
        jobs = [self._queue.get()]
        while len(jobs) < DRAIN_MAX:
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _process(self, jobs: list[Job]) -> None:
        now = datetime.now(UTC)
        observations: list[RolloutObservation] = []
        outputs: list[ModelOutput] = []
        outcomes = []
        for job in jobs:
            observations.append(
                RolloutObservation(
                    created_at=now,
                    model_id=job.answered.id,
                    answered=True,
                    latency_ms=job.latency_ms,
                    error=job.error,
                )
            )
            if job.companion is None:
                continue
            if time.monotonic() - job.queued > self.timeout_s:
                outcomes.append("stale")
                continue
            observation, job_outputs = _score_companion(job, now)
            observations.append(observation)
            outputs += job_outputs
            outcomes.append("done")
        db.session.add_all([*observations, *outputs])
        try:
            db.session.commit()
        except IntegrityError:
            # A prediction was deleted meanwhile (its owner, the retention purge): its answers
            # go with it; the observations of both models still count for the checks.
            db.session.rollback()
            db.session.add_all(observations)
            db.session.commit()
        for outcome in outcomes:
            self._count(outcome)
        rollout_state.maybe_check()


def _score_companion(job: Job, now: datetime) -> tuple[RolloutObservation, list[ModelOutput]]:
    """The companion's answers to the job's uploads, timed; a failure is observed, not raised."""
    model, role = job.companion, job.companion_role
    started = time.perf_counter()
    try:
        predictions = model.score(job.decoded)
    except Exception as exc:  # the challenger failing off the path is a finding, not an outage
        log.warning("the %s model (id %s) failed off the path: %s", role, model.id, exc)
        ERRORS.labels(**_labels(model, role)).inc()
        return RolloutObservation(created_at=now, model_id=model.id, answered=False, latency_ms=None, error=True), []
    elapsed = (time.perf_counter() - started) * 1000
    LATENCY.labels(**_labels(model, role), path="scored").observe(elapsed / 1000)
    outputs = []
    for prediction_id, prediction in zip(job.prediction_ids, predictions, strict=True):
        ANSWERS.labels(**_labels(model, role), path="scored", decision=prediction.decision).inc()
        if prediction_id is None:
            continue  # the history is off: nothing to key the answer by
        outputs.append(
            ModelOutput(
                prediction_id=prediction_id,
                model_id=model.id,
                model_name=model.name,
                model_version=model.version,
                role=role,
                created_at=now,
                top_class=prediction.top_class,
                confidence=prediction.top_probability,
                decision=prediction.decision,
                ood_score=prediction.ood_score,
                probabilities=[prediction.probabilities[name] for name in model.class_names],
                latency_ms=elapsed / len(predictions),
            )
        )
    observation = RolloutObservation(created_at=now, model_id=model.id, answered=False, latency_ms=elapsed, error=False)
    return observation, outputs


class Rollout:
    """One app's rollout runtime: the plan its poller last read, and its off-path worker."""

    def __init__(self, app: Flask):
        self.plan = rollout_state.Plan()
        self.worker = OffPathWorker(
            app, int(app.config["ROLLOUT_QUEUE_SIZE"]), float(app.config["ROLLOUT_TIMEOUT_SECONDS"])
        )

    def assignments(self) -> Mapping[str, SlotKey]:
        """The slots' versions (the champion, and the challenger while there is one); the plan is
        read in the same poll. Runs in the poller's app context, never in a request."""
        wanted = dict(serving.registry_assignments())
        plan = rollout_state.read_plan()
        key = slot_key(plan.challenger_id) if plan.challenger_id is not None else None
        if key is not None:
            wanted[CHALLENGER] = key
        self.plan = plan if key is not None else rollout_state.Plan()
        return wanted

    def route(
        self, slots: serving.ModelSlots, uploads: list[Upload], draw: Callable[[], float] = random.random
    ) -> Route:
        """Who answers these uploads: the challenger for a canary's share of images (by the hash
        of the upload, the first one's for several), else the champion; and who scores off the path."""
        champion = slots.slot(CHAMPION)
        if champion is None:
            raise WebError(slots.error(CHAMPION) or "no model is loaded", "no_model")
        plan, challenger = self.plan, slots.slot(CHALLENGER)
        if challenger is None or challenger.id != plan.challenger_id:
            return Route(champion, CHAMPION)  # off, or the challenger is not loaded here yet
        if plan.mode == "canary" and rollout_checks.goes_to_challenger(
            model_store.sha256_of(uploads[0].data), plan.share
        ):
            return Route(challenger, CHALLENGER, champion, CHAMPION)
        if plan.mode == "shadow" and draw() < plan.sample:
            return Route(champion, CHAMPION, challenger, CHALLENGER)
        return Route(champion, CHAMPION)

    @property
    def active(self) -> bool:
        return self.plan.mode != "off"


def init_app(app: Flask) -> None:
    for key, value in DEFAULTS.items():
        app.config.setdefault(key, value)
    app.extensions["rollout"] = Rollout(app)


def runtime() -> Rollout:
    return current_app.extensions["rollout"]


def classify(
    model_serving, uploads: list[Upload], thumbnail_side: int, explain_side: int
) -> tuple[LoadedModel, Classification, Route]:
    """Answer with the routed version. A challenger that fails answers nothing: the champion
    answers instead and the failure is observed."""
    rollout = runtime()
    route = rollout.route(model_serving.slots, uploads)
    companions = [route.companion] if route.companion else []
    try:
        result = model_serving.classify(uploads, route.answering, thumbnail_side, explain_side, companions)
    except (ImageError, WebError):
        raise
    except Exception as exc:
        if route.role == CHAMPION:
            raise
        log.warning("the challenger (id %s) failed on a canary request: %s", route.answering.id, exc)
        ERRORS.labels(**_labels(route.answering, CHALLENGER)).inc()
        failed = Job([], [], route.answering, CHALLENGER, 0.0, True, None, None)
        rollout.worker.submit(failed)
        route = Route(route.companion, CHAMPION)
        result = model_serving.classify(uploads, route.answering, thumbnail_side, explain_side)
    return route.answering, result, route


def follow_up(route: Route, result: Classification) -> None:
    """Queue the off-path part of an answered request (nothing while no challenger exists)."""
    rollout = runtime()
    if not rollout.active:
        return
    labels = _labels(route.answering, route.role)
    LATENCY.labels(**labels, path="answered").observe(result.elapsed_ms / 1000)
    for image in result.images:
        ANSWERS.labels(**labels, path="answered", decision=image.prediction.decision).inc()
    job = Job(
        list(result.decoded) if route.companion else [],
        [image.history_id for image in result.images],
        route.answering,
        route.role,
        result.elapsed_ms,
        False,
        route.companion,
        route.companion_role,
    )
    rollout.worker.submit(job)
