"""Prediction history and feedback: what the app predicted, and what people said was right.

Every prediction is recorded with the model version, top class, confidence, a hash of the image
and (unless KEEP_IMAGES is off) a small thumbnail. People mark predictions right or wrong; the
marked images export as an image-folder data set that `train.py --data` reads.

Each prediction has an owner (an account, or an anonymous browser session) and each piece of
feedback an author; a `Viewer` sees only their own predictions unless an operator. Predictions
older than the retention period are purged, by `flask purge-history` or, at most once an interval
per process, by `HistoryPurge` (which web/privacy.py runs before requests).
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Set
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    case,
    delete,
    false,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, deferred, mapped_column

from accounts import Viewer
from app_errors import AppError
from database import db
from monitoring import windows as drift_windows
from serving import ClassifiedImage

# "none": the image is none of the model's classes (offered on "unknown" answers).
VERDICTS = ("right", "wrong", "none")


class HistoryError(AppError):
    """A history operation that cannot be done; the message says why."""

    code = "bad_feedback"


class PredictionNotFound(HistoryError):
    """No prediction with that id that the viewer may see."""

    code = "not_found"


class FeedbackLocked(HistoryError):
    """Feedback someone else gave, which only they or an operator may change."""

    code = "feedback_locked"


class HistoryEntry(db.Model):
    """One image's prediction, and the feedback given on it."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"), index=True)
    model_name: Mapped[str] = mapped_column(String(100), nullable=False)
    model_version: Mapped[int] = mapped_column(Integer, nullable=False)
    source: Mapped[str] = mapped_column(String(10), nullable=False)
    filename: Mapped[str] = mapped_column(String(100), nullable=False)
    top_class: Mapped[str] = mapped_column(String(100), nullable=False, index=True)
    # The classes of the model that made the prediction: feedback is checked against these,
    # even after that model is deleted. NULL only on rows older than this column whose model is gone.
    class_names: Mapped[list | None] = mapped_column(JSON)
    confidence: Mapped[float] = mapped_column(Float, nullable=False)
    # confident | unsure | unknown (inference/calibration.py); NULL for predictions made before it existed.
    decision: Mapped[str | None] = mapped_column(String(10), index=True)
    ood_score: Mapped[float | None] = mapped_column(Float)
    # Calibrated probabilities in `class_names` order, for the label queue's margin and the
    # feedback check (migration 0012); NULL on older rows.
    probabilities: Mapped[list | None] = deferred(mapped_column(JSON))
    image_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    thumbnail: Mapped[bytes | None] = deferred(mapped_column(LargeBinary))
    feedback: Mapped[str | None] = mapped_column(String(10))
    correct_class: Mapped[str | None] = mapped_column(String(100))
    feedback_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    owner_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    owner_session: Mapped[str | None] = mapped_column(String(64), index=True)
    feedback_user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    feedback_author: Mapped[str | None] = mapped_column(String(100))

    @property
    def labelled_class(self) -> str | None:
        """The class people confirmed: the prediction if marked right, the given class if wrong."""
        if self.feedback == "right":
            return self.top_class
        if self.feedback == "wrong":
            return self.correct_class
        return None


class ModelOutput(db.Model):
    """What one model answered for a recorded prediction, beside the answer the person saw.

    A shadow challenger's answers, and the champion's answers to a canary's requests, land here
    keyed by prediction and model; they never change the history entry itself."""

    __tablename__ = "model_outputs"
    __table_args__ = (UniqueConstraint("prediction_id", "model_id", name="uq_model_outputs_prediction_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"), index=True)
    model_name: Mapped[str] = mapped_column(String(100), nullable=False)
    model_version: Mapped[int] = mapped_column(Integer, nullable=False)
    # The slot the model held when it answered: "champion" or "challenger".
    role: Mapped[str] = mapped_column(String(10), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    top_class: Mapped[str] = mapped_column(String(100), nullable=False)
    confidence: Mapped[float] = mapped_column(Float, nullable=False)
    decision: Mapped[str | None] = mapped_column(String(10))
    ood_score: Mapped[float | None] = mapped_column(Float)
    # Calibrated probabilities in the model's class order.
    probabilities: Mapped[list] = mapped_column(JSON, nullable=False)
    latency_ms: Mapped[float | None] = mapped_column(Float)


class RolloutObservation(db.Model):
    """One model's call for one request while a challenger is tried: latency when it answered, and
    whether it failed (the canary's latency and error checks read them). Purged with the
    predictions of its time."""

    __tablename__ = "rollout_observations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    model_id: Mapped[int] = mapped_column(Integer, nullable=False, index=True)
    answered: Mapped[bool] = mapped_column(Boolean, nullable=False)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    error: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


def record(
    images: list[ClassifiedImage], model, source: str, keep_images: bool, owner: Viewer | None = None
) -> list[ClassifiedImage]:
    """Store predictions made by `model` (a LoadedModel) for `owner` in one transaction; returns
    the images with their history ids. Thumbnails are kept only when `keep_images` is on."""
    owner = owner or Viewer()
    now = datetime.now(UTC)
    rows = [
        HistoryEntry(
            created_at=now,
            model_id=model.id,
            model_name=model.name,
            model_version=model.version,
            source=source,
            filename=image.filename,
            top_class=image.prediction.top_class,
            class_names=list(model.class_names),
            confidence=image.prediction.top_probability,
            decision=image.prediction.decision,
            ood_score=image.prediction.ood_score,
            probabilities=[image.prediction.probabilities[name] for name in model.class_names],
            image_sha256=image.image_sha256,
            thumbnail=image.thumbnail if keep_images else None,
            owner_user_id=owner.user_id,
            owner_session=None if owner.user_id else owner.session_id,
        )
        for image in images
    ]
    db.session.add_all(rows)
    try:
        ids = _flushed_ids(rows)
    except IntegrityError:
        # The version this worker still serves was deleted meanwhile: keep its name and
        # version, drop the link.
        db.session.rollback()
        for row in rows:
            row.model_id = None
        db.session.add_all(rows)
        ids = _flushed_ids(rows)
    model_id = rows[0].model_id if rows else None
    db.session.commit()
    drift_windows.record(ids, model_id, now, images, model.class_names)
    return [replace(image, history_id=row_id) for image, row_id in zip(images, ids, strict=True)]


def _flushed_ids(rows: list[HistoryEntry]) -> list[int]:
    """The rows' ids, read once they are inserted and before the commit expires them (read after
    it, each would cost a SELECT more per image on the request path)."""
    db.session.flush()
    return [row.id for row in rows]


def _visible_to(statement, viewer: Viewer | None):
    """Only the viewer's own predictions; None (the operator's CLI) and operators see all."""
    if viewer is None or viewer.operator:
        return statement
    return statement.where(*_owned_by(viewer))


def _owned_by(viewer: Viewer) -> tuple:
    if viewer.user_id is not None:
        return (HistoryEntry.owner_user_id == viewer.user_id,)
    if viewer.session_id is None:
        return (false(),)  # a request without a session (a script) owns nothing
    return (HistoryEntry.owner_user_id.is_(None), HistoryEntry.owner_session == viewer.session_id)


def query(
    top_class: str | None = None, model_id: int | None = None, decision: str | None = None, viewer: Viewer | None = None
):
    """Predictions the viewer may see, newest first, filtered by predicted class, model version and decision."""
    statement = _visible_to(select(HistoryEntry).order_by(HistoryEntry.id.desc()), viewer)
    if decision:
        statement = statement.where(HistoryEntry.decision == decision)
    if top_class:
        statement = statement.where(HistoryEntry.top_class == top_class)
    if model_id:
        statement = statement.where(HistoryEntry.model_id == model_id)
    return statement


def get(prediction_id: int, viewer: Viewer | None = None) -> HistoryEntry:
    """A prediction the viewer may see; someone else's is "not found", like one that never was."""
    statement = _visible_to(select(HistoryEntry).where(HistoryEntry.id == prediction_id), viewer)
    row = db.session.scalar(statement)
    if row is None:
        raise PredictionNotFound(f"no prediction with id {prediction_id}")
    return row


def set_feedback(
    prediction_id: int, verdict: str, correct_class: str | None, viewer: Viewer | None = None
) -> HistoryEntry:
    """Mark a prediction right, or wrong with the class it should have been, as `viewer`.

    Feedback another account gave stays unless an operator changes it."""
    viewer = viewer or Viewer(operator=True, name="operator")
    row = get(prediction_id, viewer)
    if row.feedback and not viewer.operator and row.feedback_user_id != viewer.user_id:
        raise FeedbackLocked(f"prediction #{row.id} was marked by {row.feedback_author}; only they can change it")
    if verdict not in VERDICTS:
        raise HistoryError("feedback must be 'right', 'wrong' or 'none' (none of the classes)")
    if verdict == "wrong":
        if not correct_class:
            raise HistoryError("say which class is right when marking a prediction wrong")
        if row.class_names is None:
            raise HistoryError("the model that made this prediction is deleted and its classes are not known")
        if correct_class not in row.class_names:
            raise HistoryError(
                f"{correct_class[:100]!r} is not one of the classes of the model that made this prediction"
            )
        if correct_class == row.top_class:
            raise HistoryError("the class given is the predicted one: mark it right instead")
    row.feedback = verdict
    row.correct_class = correct_class if verdict == "wrong" else None
    row.feedback_at = datetime.now(UTC)
    row.feedback_user_id, row.feedback_author = viewer.user_id, viewer.name
    db.session.commit()
    return row


def delete_prediction(prediction_id: int, viewer: Viewer) -> None:
    db.session.delete(get(prediction_id, viewer))
    db.session.commit()


def forget(viewer: Viewer) -> int:
    """Delete every prediction the viewer owns (an operator's own too, not everyone's); how many."""
    result = db.session.execute(delete(HistoryEntry).where(*_owned_by(viewer)))
    db.session.commit()
    return result.rowcount


def count_owned(viewer: Viewer) -> int:
    """How many predictions the viewer owns (an operator's own, not everyone's)."""
    return db.session.scalar(select(func.count()).select_from(HistoryEntry).where(*_owned_by(viewer)))


def adopt(anonymous: Viewer, account: Viewer) -> int:
    """Give an anonymous visitor's predictions to the account it logged in as; how many."""
    statement = (
        update(HistoryEntry).where(*_owned_by(anonymous)).values(owner_user_id=account.user_id, owner_session=None)
    )
    result = db.session.execute(statement)
    db.session.commit()
    return result.rowcount


def purge(retention_days: float, now: datetime | None = None) -> int:
    """Delete predictions older than the retention period, and the rollout observations of that
    time; how many predictions. A period of 0 (or less) means "kept until deleted": nothing is
    purged (purge_all deletes every prediction)."""
    if retention_days <= 0:
        return 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    result = db.session.execute(delete(HistoryEntry).where(HistoryEntry.created_at < cutoff))
    db.session.execute(delete(RolloutObservation).where(RolloutObservation.created_at < cutoff))
    db.session.commit()
    return result.rowcount


# Purging from requests: often enough that nothing outlives its period by much, rarely enough
# that a request almost never pays for it.
PURGE_INTERVAL_S = 3600


class HistoryPurge:
    """Deletes predictions older than the retention period at most once per interval per process,
    and never from two threads of one process at once."""

    def __init__(self, interval_s: float = PURGE_INTERVAL_S):
        self.interval_s = interval_s
        self._last: float | None = None
        self._lock = threading.Lock()

    def maybe_run(self, retention_days: float) -> int | None:
        """Purge if due: how many were deleted, or None when not due, already running, or the
        period is 0 (kept until deleted). A database error propagates; the interval still counts."""
        if not retention_days:
            return None
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval_s:
            return None
        if not self._lock.acquire(blocking=False):
            return None  # another thread of this process is purging now
        try:
            self._last = now
            return purge(float(retention_days))
        finally:
            self._lock.release()


def purge_all() -> int:
    """Delete every prediction of everyone, and every rollout observation; how many predictions."""
    result = db.session.execute(delete(HistoryEntry))
    db.session.execute(delete(RolloutObservation))
    db.session.commit()
    return result.rowcount


@dataclass(frozen=True)
class ModelFeedback:
    model_name: str
    model_version: int
    predictions: int
    marked: int
    marked_right: int
    marked_none: int

    @property
    def right_rate(self) -> float | None:
        return self.marked_right / self.marked if self.marked else None


def feedback_by_model(viewer: Viewer | None = None) -> list[ModelFeedback]:
    """Per model version, over the predictions the viewer sees: made, marked, marked right, and
    marked "none of these classes"."""
    marked = func.count(HistoryEntry.feedback)
    right = func.sum(case((HistoryEntry.feedback == "right", 1), else_=0))
    none = func.sum(case((HistoryEntry.feedback == "none", 1), else_=0))
    statement = (
        select(HistoryEntry.model_name, HistoryEntry.model_version, func.count(), marked, right, none)
        .group_by(HistoryEntry.model_name, HistoryEntry.model_version)
        .order_by(HistoryEntry.model_name, HistoryEntry.model_version.desc())
    )
    statement = _visible_to(statement, viewer)
    return [
        ModelFeedback(n, v, total, m, int(r or 0), int(x or 0))
        for n, v, total, m, r, x in db.session.execute(statement)
    ]


def export_feedback(directory: Path, held_back: Set[int] = frozenset()) -> dict[str, int]:
    """Write every marked prediction's thumbnail, but those in `held_back`, to
    `directory/<class>/<id>.jpg`, and who marked each and when to `directory/feedback.csv`;
    counts per class."""
    counts: dict[str, int] = {}
    statement = select(HistoryEntry).where(HistoryEntry.feedback.is_not(None)).order_by(HistoryEntry.id)
    authors = []
    for row in db.session.scalars(statement):
        label = row.labelled_class
        if not row.thumbnail or not label or row.id in held_back:
            continue
        folder = directory / _safe_folder_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{row.id}.jpg").write_bytes(row.thumbnail)
        counts[label] = counts.get(label, 0) + 1
        authors.append((f"{folder.name}/{row.id}.jpg", label, row.feedback_author or "", row.feedback_at.isoformat()))
    if authors:
        with (directory / "feedback.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("file", "class", "author", "marked_at"))
            writer.writerows(authors)
    return counts


def _safe_folder_name(label: str) -> str:
    """Class names come from model metadata; keep them from naming paths outside the folder."""
    cleaned = "".join(ch if ch.isalnum() or ch in "-_ ." else "_" for ch in label).strip(" .")
    return cleaned or "_"
