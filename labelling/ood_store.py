"""The OOD threshold from the label queue's labels, in the database: the evidence of a served
model's labelled predictions, the proposal (labelling/ood_tuning.py decides), and applying it to
the model's calibration record, with a log of who changed what on how many labels.

Only the model's own predictions made since its OOD statistics were fitted count: a new fit
(`flask calibrate`) standardises the score anew, so older scores are not comparable. Applying a
threshold keeps those statistics, so the log carries the fit's time forward. Feedback an operator
rejected is left out. "None of these" answers stay out of the training export whatever happens
here (prediction_history.export_feedback writes labelled classes only).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, select
from sqlalchemy.orm import Mapped, mapped_column

import model_store
from database import db
from inference.calibration import Calibration
from inference.ood import HELDOUT_PASS_RATE
from labelling import store
from labelling.ood_tuning import Proposal, TooFewLabels, propose
from labelling.queue import REJECTED
from model_store import ModelCalibration
from monitoring import store as drift_store
from monitoring import windows as drift_windows
from prediction_history import HistoryEntry

# The lanes whose labels are evidence: random (uniform: in scope or not) and ood (the highest scores).
EVIDENCE_LANES = ("random", "ood")
IN_SCOPE_VERDICTS = ("right", "wrong")


class OodThresholdChange(db.Model):
    """An OOD threshold applied from labels: by whom, from what to what, on how many labels."""

    __tablename__ = "ood_threshold_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    # The calibration time the change gave the model (model_calibrations.created_at).
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    author: Mapped[str] = mapped_column(String(100), nullable=False)
    old_threshold: Mapped[float] = mapped_column(Float, nullable=False)
    new_threshold: Mapped[float] = mapped_column(Float, nullable=False)
    in_scope_labels: Mapped[int] = mapped_column(Integer, nullable=False)
    none_labels: Mapped[int] = mapped_column(Integer, nullable=False)
    # When the OOD statistics the labelled scores were computed with were fitted.
    scores_since: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class NotTunable(ValueError):
    """No served model with an OOD calibration to tune."""


@dataclass(frozen=True)
class Evidence:
    """A model's labelled OOD scores since its OOD statistics were fitted."""

    model_id: int
    current: float
    pass_rate: float
    scores_since: datetime
    in_scope: list[float]
    none: list[float]


def _calibration(model_id: int | None) -> ModelCalibration:
    """The calibration of `model_id` (default: the active model), which must have an OOD part."""
    if model_id is None:
        active = model_store.get_active()
        if active is None:
            raise NotTunable("no model is active: import one with `flask models import`")
        model_id = active.id
    row = db.session.get(ModelCalibration, model_id)
    if row is None or (row.summary or {}).get("ood_threshold") is None:
        raise NotTunable(f"model {model_id} has no OOD calibration to tune: run `flask calibrate` first")
    return row


def _scores_since(row: ModelCalibration) -> datetime:
    """When the model's OOD statistics were fitted: the calibration's time, unless that time is a
    threshold change's (which kept the statistics of an earlier fit)."""
    latest = db.session.scalar(
        select(OodThresholdChange)
        .where(OodThresholdChange.model_id == row.model_id)
        .order_by(OodThresholdChange.id.desc())
        .limit(1)
    )
    return latest.scores_since if latest is not None and latest.applied_at == row.created_at else row.created_at


def evidence(model_id: int | None = None) -> Evidence:
    """The labelled scores of the ood and random lanes for the model (default: the active one)."""
    row = _calibration(model_id)
    ood = model_store.get_calibration(row.model_id)["ood"]
    since = _scores_since(row)
    statement = (
        select(HistoryEntry.id, HistoryEntry.feedback, HistoryEntry.ood_score, store.LabelItem.lane)
        .join(store.LabelItem, store.LabelItem.prediction_id == HistoryEntry.id)
        .where(
            HistoryEntry.model_id == row.model_id,
            HistoryEntry.created_at >= since,
            HistoryEntry.ood_score.is_not(None),
            HistoryEntry.feedback.is_not(None),
            store.LabelItem.lane.in_(EVIDENCE_LANES),
        )
    )
    rejected = {pid for pid, review in store.reviews().items() if review.status == REJECTED}
    lanes: dict[int, set[str]] = {}
    answers: dict[int, tuple[str, float]] = {}
    for pid, feedback, score, lane in db.session.execute(statement):
        if pid not in rejected:
            lanes.setdefault(pid, set()).add(lane)
            answers[pid] = (feedback, score)
    return Evidence(
        model_id=row.model_id,
        current=float(ood["threshold"]),
        pass_rate=float(ood.get("heldout_pass_rate", HELDOUT_PASS_RATE)),
        scores_since=since,
        in_scope=[s for pid, (f, s) in answers.items() if f in IN_SCOPE_VERDICTS and "random" in lanes[pid]],
        none=[s for f, s in answers.values() if f == "none"],
    )


def proposal(model_id: int | None = None) -> Proposal:
    """The threshold the labels support for the model (NotTunable, TooFewLabels: why not)."""
    found = evidence(model_id)
    return propose(found.in_scope, found.none, found.current, found.pass_rate)


def apply(author: str, model_id: int | None = None) -> tuple[Proposal, OodThresholdChange]:
    """Write the proposed threshold into the model's calibration record (a new calibration time:
    serving workers reload the model), take the drift reference's decisions again at it (its
    windows start again), and log the change, in one transaction."""
    found = evidence(model_id)
    proposed = propose(found.in_scope, found.none, found.current, found.pass_rate)
    record = model_store.get_full_calibration(found.model_id)
    record = {**record, "ood": {**record["ood"], "threshold": proposed.proposed}}
    drift_windows.close_period_windows(found.model_id)  # the days and weeks due, at the threshold they had
    try:
        applied_at = model_store.put_calibration(found.model_id, record)
        reference = drift_store.locked_reference(found.model_id)  # not one a refit replaces meanwhile
        if reference is not None:  # its decisions taken again at the new threshold
            drift_store.put_reference(found.model_id, reference.decided_by(Calibration.from_record(record)))
        change = OodThresholdChange(
            model_id=found.model_id,
            applied_at=applied_at,
            author=author[:100],
            old_threshold=found.current,
            new_threshold=proposed.proposed,
            in_scope_labels=proposed.in_scope_labels,
            none_labels=proposed.none_labels,
            scores_since=found.scores_since,
        )
        db.session.add(change)
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise
    return proposed, change


def changes(limit: int = 10) -> list[OodThresholdChange]:
    """The latest threshold changes, newest first."""
    return list(db.session.scalars(select(OodThresholdChange).order_by(OodThresholdChange.id.desc()).limit(limit)))


def status(model_id: int | None = None) -> tuple[Proposal | None, str | None]:
    """The proposal for the page, or why there is none."""
    try:
        return proposal(model_id), None
    except (NotTunable, TooFewLabels) as exc:
        return None, str(exc)
