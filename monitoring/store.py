"""Drift monitoring in the database: each model's reference, the few floats kept per prediction,
and the closed windows' results.

- `drift_references`: a model's reference (monitoring/reference.py) as a safetensors BLOB, with a
  small JSON summary; deleted with the model.
- `drift_samples`: per recorded prediction, the predicted class, calibrated top probability,
  decision and OOD score, the input's image statistics and the PCA coordinates of its pooled
  features. They go with their prediction (ON DELETE CASCADE), so retention purges them too.
- `drift_windows`: per closed window, its tests, estimated accuracy and alerts: aggregates
  that outlive the purge. A window's model link is cleared, not deleted, with its model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, LargeBinary, String, UniqueConstraint, select
from sqlalchemy.orm import Mapped, deferred, mapped_column

from database import db
from monitoring.drift import IMAGE_STATISTICS
from monitoring.reference import Reference, statistics_row

log = logging.getLogger(__name__)


class DriftReference(db.Model):
    """A model's drift reference: its summary (JSON) and the whole reference (safetensors BLOB)."""

    __tablename__ = "drift_references"

    model_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    summary: Mapped[dict] = mapped_column(JSON, nullable=False)
    data: Mapped[bytes] = deferred(mapped_column(LargeBinary, nullable=False))


class DriftSample(db.Model):
    """The drift floats of one recorded prediction."""

    __tablename__ = "drift_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    model_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    class_index: Mapped[int] = mapped_column(Integer, nullable=False)
    top_probability: Mapped[float] = mapped_column(Float, nullable=False)
    decision: Mapped[str | None] = mapped_column(String(10))
    ood_score: Mapped[float | None] = mapped_column(Float)
    brightness_mean: Mapped[float] = mapped_column(Float, nullable=False)
    brightness_std: Mapped[float] = mapped_column(Float, nullable=False)
    saturation_mean: Mapped[float] = mapped_column(Float, nullable=False)
    sharpness: Mapped[float] = mapped_column(Float, nullable=False)
    # PCA coordinates of the pooled features (reference.PCA_COMPONENTS floats); NULL without a reference.
    embedding: Mapped[list | None] = mapped_column(JSON)


class DriftWindow(db.Model):
    """One closed window of a model version's predictions and what its tests found."""

    __tablename__ = "drift_windows"
    __table_args__ = (UniqueConstraint("model_id", "kind", "key", name="uq_drift_windows_model_kind_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"), index=True)
    model_name: Mapped[str] = mapped_column(String(100), nullable=False)
    model_version: Mapped[int] = mapped_column(Integer, nullable=False)
    # "count" (every WINDOW_SIZE predictions), "day" or "week" (UTC).
    kind: Mapped[str] = mapped_column(String(10), nullable=False)
    # What makes the window unique for its model and kind: its first sample id, or its period.
    key: Mapped[str] = mapped_column(String(40), nullable=False)
    start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    end: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_sample_id: Mapped[int] = mapped_column(Integer, nullable=False)
    count: Mapped[int] = mapped_column(Integer, nullable=False)
    estimated_accuracy: Mapped[float] = mapped_column(Float, nullable=False)
    accuracy_se: Mapped[float] = mapped_column(Float, nullable=False)
    reference_accuracy: Mapped[float] = mapped_column(Float, nullable=False)
    unknown_rate: Mapped[float] = mapped_column(Float, nullable=False)
    min_p_value: Mapped[float] = mapped_column(Float, nullable=False)
    alerts: Mapped[list] = mapped_column(JSON, nullable=False)
    tests: Mapped[list] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


def set_reference(model_id: int, reference: Reference) -> None:
    """Store (or replace) a model's drift reference, and commit."""
    put_reference(model_id, reference)
    db.session.commit()


def put_reference(model_id: int, reference: Reference) -> None:
    """Store (or replace) a model's drift reference in the caller's transaction; its new time
    starts the model's windows again (monitoring/windows.py)."""
    row = db.session.get(DriftReference, model_id) or DriftReference(model_id=model_id)
    row.created_at = datetime.now(UTC)
    row.summary = reference.summary()
    row.data = reference.to_bytes()
    db.session.add(row)


def locked_reference(model_id: int) -> Reference | None:
    """The model's stored reference, its row locked until the caller's transaction ends
    (PostgreSQL; SQLite lets one writer at a time anyway), for a change made from it."""
    data = db.session.scalar(select(DriftReference.data).where(DriftReference.model_id == model_id).with_for_update())
    return None if data is None else Reference.from_bytes(data)


def reference_summary(model_id: int) -> dict | None:
    return db.session.scalar(select(DriftReference.summary).where(DriftReference.model_id == model_id))


class ReferenceCache:
    """Each model's parsed reference, read again only when its stored time changes (a refit)."""

    def __init__(self) -> None:
        self._cached: dict[int, tuple[datetime, Reference]] = {}
        self._lock = threading.Lock()

    def get(self, model_id: int) -> Reference | None:
        fitted = self.get_fitted(model_id)
        return None if fitted is None else fitted[1]

    def get_fitted(self, model_id: int) -> tuple[datetime, Reference] | None:
        """The model's reference and when it was stored (naive UTC on SQLite), or None."""
        stamp = db.session.scalar(select(DriftReference.created_at).where(DriftReference.model_id == model_id))
        if stamp is None:
            return None
        cached = self._cached.get(model_id)
        if cached is not None and cached[0] == stamp:
            return cached
        data = db.session.scalar(select(DriftReference.data).where(DriftReference.model_id == model_id))
        fitted = (stamp, Reference.from_bytes(data))
        with self._lock:
            self._cached[model_id] = fitted
        return fitted


references = ReferenceCache()


def add_samples(
    prediction_ids: Sequence[int], model_id: int, created_at: datetime, images, class_names: tuple[str, ...]
) -> list[DriftSample]:
    """Drift samples for predictions recorded together (their ids, and the ClassifiedImages they
    came from), added to the session uncommitted. Images without statistics have none."""
    samples = []
    reference = references.get(model_id)
    for prediction_id, image in zip(prediction_ids, images, strict=True):
        if image.statistics is None:
            continue
        prediction = image.prediction
        embedding = reference.project(prediction.features) if reference is not None else None
        values = dict(zip(IMAGE_STATISTICS, statistics_row(image.statistics), strict=True))
        samples.append(
            DriftSample(
                prediction_id=prediction_id,
                model_id=model_id,
                created_at=created_at,
                class_index=class_names.index(prediction.top_class),
                top_probability=prediction.top_probability,
                decision=prediction.decision,
                ood_score=prediction.ood_score,
                embedding=None if embedding is None else np.round(embedding[0], 5).tolist(),
                **values,
            )
        )
    db.session.add_all(samples)
    return samples
