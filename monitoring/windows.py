"""Windows of a model version's predictions, closed and tested as predictions are recorded.

Three kinds per model version: every WINDOW_SIZE predictions ("count"), and each UTC day and ISO
week with at least MIN_COUNT predictions. A count window closes in the request that records its
last prediction; day and week windows close on the first record of a process after their period
ends, and whenever the monitoring page, `flask drift report` or the gauges read them. A closed
window's results are stored (monitoring/store.py, drift_windows); its samples go with their
predictions when retention purges them. Only samples recorded since the model's reference was
(re)fitted count: those before a refit were scored and projected with the calibration and
reference it replaced, so a window mixing both would flag the refit itself as drift (the commands
that refit close the days and weeks already due first). The boundary is the reference's time: a
worker that has not polled the new calibration yet (a second) can still put a few samples scored
the old way in the first window after it. A period
longer than the retention period loses its oldest samples: keep RETENTION_DAYS at 7 or more for
weekly windows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from database import db
from model_store import ModelVersion
from monitoring import drift, metrics
from monitoring.drift import IMAGE_STATISTICS
from monitoring.reference import Reference
from monitoring.store import DriftSample, DriftWindow, add_samples, references

log = logging.getLogger(__name__)

WINDOW_SIZE = 500
MIN_WINDOW_SIZE = 200
MIN_COUNT = 200
PERIODS = {"day": timedelta(days=1), "week": timedelta(weeks=1)}


def record(
    prediction_ids: Sequence[int],
    model_id: int | None,
    created_at: datetime,
    images: Sequence,
    class_names: Sequence[str],
    window_size: int = WINDOW_SIZE,
) -> None:
    """After predictions are recorded (their ids, the model version's id, or None when it was
    deleted meanwhile): keep their drift samples, then close the model's count windows that are
    full. A failure here is logged; the predictions stay recorded."""
    if model_id is None:
        return
    try:
        if not add_samples(prediction_ids, model_id, created_at, images, tuple(class_names)):
            return
        db.session.commit()
        close_count_windows(model_id, window_size)
        _periods_due.run(model_id)
    except SQLAlchemyError as exc:
        db.session.rollback()
        log.warning("drift samples not recorded: %s", exc)


def sample_of(rows: Sequence[DriftSample]) -> drift.Sample:
    """The drift.Sample of stored samples (in their order)."""
    ood = [r.ood_score for r in rows]
    embeddings = [r.embedding for r in rows]
    return drift.Sample(
        classes=np.array([r.class_index for r in rows], np.int64),
        top_probability=np.array([r.top_probability for r in rows], np.float64),
        decisions=np.array([r.decision or "confident" for r in rows]),
        ood_scores=None if any(v is None for v in ood) else np.array(ood, np.float64),
        statistics=np.array([[getattr(r, name) for name in IMAGE_STATISTICS] for r in rows], np.float64),
        embeddings=None if any(e is None for e in embeddings) else np.array(embeddings, np.float64),
    )


def evaluate(samples: Sequence[DriftSample], reference: Reference, seed: int) -> drift.WindowReport:
    """The tests of a window's samples against the model's reference."""
    return drift.evaluate(sample_of(samples), reference.sample, len(reference.class_names), seed)


def _store(model_id: int, kind: str, key: str, start, end, samples: Sequence[DriftSample], reference) -> None:
    report = evaluate(samples, reference, seed=samples[0].id)
    model = db.session.get(ModelVersion, model_id)
    window = DriftWindow(
        model_id=model_id,
        model_name=model.name,
        model_version=model.version,
        kind=kind,
        key=key,
        start=start,
        end=end,
        last_sample_id=samples[-1].id,
        count=len(samples),
        estimated_accuracy=report.accuracy.value,
        accuracy_se=report.accuracy.se,
        reference_accuracy=report.accuracy.reference,
        unknown_rate=float(np.mean([s.decision == "unknown" for s in samples])),
        min_p_value=report.min_p_value,
        alerts=report.alerts,
        tests=[t.to_dict() for t in report.tests],
        created_at=datetime.now(UTC),
    )
    db.session.add(window)
    try:
        db.session.commit()
    except IntegrityError:  # another worker closed the same window first
        db.session.rollback()
        return
    if kind == "count":
        metrics.drift_window(model, window.estimated_accuracy, window.unknown_rate, window.min_p_value)


def close_count_windows(model_id: int, size: int = WINDOW_SIZE) -> int:
    """Close every full window of `size` predictions of a model not yet closed; how many."""
    if size < MIN_WINDOW_SIZE:
        raise ValueError(f"a drift window needs at least {MIN_WINDOW_SIZE} predictions")
    fitted = references.get_fitted(model_id)
    if fitted is None:
        return 0
    fitted_at, reference = fitted
    closed = 0
    while True:
        last = db.session.scalar(
            select(func.max(DriftWindow.last_sample_id)).where(
                DriftWindow.model_id == model_id, DriftWindow.kind == "count"
            )
        )
        pending = (DriftSample.model_id == model_id, DriftSample.id > (last or 0), DriftSample.created_at >= fitted_at)
        # Asked at every prediction: whether the window is full costs one id, not `size` samples.
        nth_id = select(DriftSample.id).where(*pending).order_by(DriftSample.id).offset(size - 1).limit(1)
        if db.session.scalar(nth_id) is None:
            return closed
        samples = list(db.session.scalars(select(DriftSample).where(*pending).order_by(DriftSample.id).limit(size)))
        _store(
            model_id, "count", f"n{samples[0].id}", samples[0].created_at, samples[-1].created_at, samples, reference
        )
        closed += 1


def period_start(moment: datetime, kind: str) -> datetime:
    """The start (UTC midnight; Monday for a week) of the day or week holding `moment`."""
    day = moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday()) if kind == "week" else day


def close_period_windows(model_id: int, now: datetime | None = None, minimum: int = MIN_COUNT) -> int:
    """Close the model's ended days and weeks with at least `minimum` predictions; how many."""
    fitted = references.get_fitted(model_id)
    if fitted is None:
        return 0
    fitted_at = fitted[0]
    now = now or datetime.now(UTC)
    first = db.session.scalar(
        select(func.min(DriftSample.created_at)).where(
            DriftSample.model_id == model_id, DriftSample.created_at >= fitted_at
        )
    )
    if first is None:
        return 0
    first, closed = _aware(first), 0
    for kind, length in PERIODS.items():
        done = db.session.scalar(
            select(func.max(DriftWindow.end)).where(DriftWindow.model_id == model_id, DriftWindow.kind == kind)
        )
        start = period_start(max(first, _aware(done)) if done else first, kind)
        while start + length <= now:
            closed += _close_period(model_id, kind, start, start + length, minimum, fitted)
            start += length
    return closed


def _close_period(
    model_id: int, kind: str, start: datetime, end: datetime, minimum: int, fitted: tuple[datetime, Reference]
) -> int:
    """Close the period if it holds `minimum` samples recorded since the reference was fitted."""
    fitted_at, reference = fitted
    statement = select(DriftSample).where(
        DriftSample.model_id == model_id,
        DriftSample.created_at >= max(start, _aware(fitted_at)),
        DriftSample.created_at < end,
    )
    samples = list(db.session.scalars(statement.order_by(DriftSample.id)))
    if len(samples) < minimum:
        return 0
    _store(model_id, kind, start.strftime("%Y-%m-%d"), start, end, samples, reference)
    return 1


def _aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes for timezone-aware columns: they are UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class _PeriodCheck:
    """Runs close_period_windows for a model at most once per UTC day per process."""

    def __init__(self) -> None:
        self._checked: dict[int, datetime] = {}
        self._lock = threading.Lock()

    def run(self, model_id: int) -> None:
        today = period_start(datetime.now(UTC), "day")
        with self._lock:
            if self._checked.get(model_id) == today:
                return
            self._checked[model_id] = today
        close_period_windows(model_id)


_periods_due = _PeriodCheck()


def close_all(now: datetime | None = None) -> None:
    """Close every due window of every model with drift samples (the page, the report, the gauges)."""
    for model_id in db.session.scalars(select(DriftSample.model_id).distinct()):
        close_count_windows(model_id)
        close_period_windows(model_id, now)


def windows(since: datetime | None = None, kind: str | None = None, limit: int | None = None) -> list[DriftWindow]:
    """Closed windows, oldest first, starting at or after `since`, of one kind or all."""
    statement = select(DriftWindow)
    if since is not None:
        statement = statement.where(DriftWindow.start >= since)
    if kind is not None:
        statement = statement.where(DriftWindow.kind == kind)
    statement = statement.order_by(DriftWindow.start.desc(), DriftWindow.id.desc())
    if limit is not None:
        statement = statement.limit(limit)
    return list(reversed(list(db.session.scalars(statement))))


def to_json(window: DriftWindow) -> dict:
    """A window as `flask drift report --json` lists it."""
    return {
        "model": {"id": window.model_id, "name": window.model_name, "version": window.model_version},
        "kind": window.kind,
        "start": _aware(window.start).isoformat(),
        "end": _aware(window.end).isoformat(),
        "count": window.count,
        "estimated_accuracy": window.estimated_accuracy,
        "estimated_accuracy_se": window.accuracy_se,
        "reference_accuracy": window.reference_accuracy,
        "unknown_rate": window.unknown_rate,
        "min_p_value": window.min_p_value,
        "alerts": list(window.alerts),
        "tests": window.tests,
    }
