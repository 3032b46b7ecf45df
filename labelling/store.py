"""The label queue in the database: rounds built from the prediction history, labels given on
their items, second opinions and operators' decisions on held feedback, and the export of
confirmed feedback only (labelling/queue.py decides; this module reads and writes).

A label given here is feedback with its author (prediction_history.set_feedback). On a
prediction someone else already marked it is a second opinion instead (a vote), which confirms
held feedback when it agrees. Privacy stays prediction_history's: a member's queue holds only
their own predictions; operators (and the CLI) see everyone's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, UniqueConstraint, func, select
from sqlalchemy.orm import Mapped, mapped_column, undefer

import prediction_history
from accounts import Viewer
from database import db
from labelling import queue
from labelling.queue import CONFIRMED, HELD, Candidate, Label, Vote
from prediction_history import HistoryEntry, HistoryError, ModelOutput, PredictionNotFound

# The newest predictions a round is drawn from: bounds the build's memory and time.
POOL_LIMIT = 20_000
NONE_ANSWER = "none"
STANCES = ("label", "confirm", "reject")


class LabelRound(db.Model):
    """One build of the queue: when, by which champion, how many items were asked for."""

    __tablename__ = "label_rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    model_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    requested: Mapped[int] = mapped_column(Integer, nullable=False)


class LabelItem(db.Model):
    """A prediction asked about in a round: its place, why (lane) and the lane's score."""

    __tablename__ = "label_items"
    __table_args__ = (UniqueConstraint("round_id", "prediction_id", name="uq_label_items_round_prediction"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("label_rounds.id", ondelete="CASCADE"), nullable=False, index=True)
    prediction_id: Mapped[int] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    lane: Mapped[str] = mapped_column(String(10), nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    labelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    labelled_by: Mapped[str | None] = mapped_column(String(100))


class LabelVote(db.Model):
    """A second person's label, or an operator's confirm or reject, of a prediction's feedback."""

    __tablename__ = "label_votes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prediction_id: Mapped[int] = mapped_column(
        ForeignKey("predictions.id", ondelete="CASCADE"), nullable=False, index=True
    )
    stance: Mapped[str] = mapped_column(String(10), nullable=False)
    verdict: Mapped[str] = mapped_column(String(10), nullable=False)
    # The class the vote is about (the prediction's own for "right"); NULL for "none".
    label: Mapped[str | None] = mapped_column(String(100))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    author: Mapped[str] = mapped_column(String(100), nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


@dataclass(frozen=True)
class Review:
    """A piece of feedback's state (confirmed, held, rejected) and why."""

    status: str
    reason: str
    label: Label


def probabilities_of(row: HistoryEntry) -> dict[str, float] | None:
    """The stored calibrated probabilities by class name; None on rows from before they were kept."""
    if row.probabilities is None or row.class_names is None:
        return None
    return dict(zip(row.class_names, row.probabilities, strict=True))


def _label(row: HistoryEntry) -> Label:
    author = (row.feedback_user_id, row.feedback_author)
    return Label(row.id, row.feedback, row.labelled_class, row.top_class, row.decision, probabilities_of(row), author)


def _marked_rows() -> list[HistoryEntry]:
    statement = (
        select(HistoryEntry)
        .options(undefer(HistoryEntry.probabilities))
        .where(HistoryEntry.feedback.is_not(None))
        .order_by(HistoryEntry.id)
    )
    return list(db.session.scalars(statement))


def _votes() -> dict[int, list[Vote]]:
    votes: dict[int, list[Vote]] = {}
    for vote in db.session.scalars(select(LabelVote).order_by(LabelVote.id)):
        votes.setdefault(vote.prediction_id, []).append(
            Vote(vote.stance, vote.verdict, vote.label, (vote.user_id, vote.author))
        )
    return votes


def reviews() -> dict[int, Review]:
    """Every marked prediction's review, by prediction id, against the thresholds of all labels."""
    labels = [_label(row) for row in _marked_rows()]
    thresholds = queue.class_thresholds(labels)
    votes = _votes()
    return {
        label.prediction_id: Review(*queue.review(label, thresholds, votes.get(label.prediction_id, [])), label)
        for label in labels
    }


def candidates() -> list[Candidate]:
    """What a round may ask about: the newest unmarked predictions with a kept image and stored
    probabilities (with the shadow challenger's latest answer), and the held feedback."""
    statement = (
        select(HistoryEntry)
        .options(undefer(HistoryEntry.probabilities))
        .where(
            HistoryEntry.feedback.is_(None),
            HistoryEntry.thumbnail.is_not(None),
            HistoryEntry.probabilities.is_not(None),
        )
        .order_by(HistoryEntry.id.desc())
        .limit(POOL_LIMIT)
    )
    rows = list(db.session.scalars(statement))
    challengers = _challenger_answers({row.id for row in rows})
    fresh = [
        Candidate(
            row.id, row.image_sha256, row.top_class, probabilities_of(row), row.ood_score, *challengers.get(row.id, ())
        )
        for row in rows
    ]
    held = {pid: review.label for pid, review in reviews().items() if review.status == HELD}
    kept = select(HistoryEntry.id, HistoryEntry.image_sha256).where(
        HistoryEntry.id.in_(held), HistoryEntry.thumbnail.is_not(None)
    )
    conflicts = [
        Candidate(
            pid, sha, held[pid].top_class, held[pid].probabilities or {}, conflict=queue.conflict_score(held[pid])
        )
        for pid, sha in (db.session.execute(kept) if held else ())
    ]
    return fresh + conflicts


def _challenger_answers(prediction_ids: set[int]) -> dict[int, tuple[str, float]]:
    """The latest shadow challenger's (top class, confidence) per prediction, among `prediction_ids`."""
    if not prediction_ids:
        return {}
    statement = (
        select(ModelOutput.prediction_id, ModelOutput.top_class, ModelOutput.confidence)
        .join(HistoryEntry, HistoryEntry.id == ModelOutput.prediction_id)
        .where(
            ModelOutput.role == "challenger",
            HistoryEntry.feedback.is_(None),
            # The pool is the newest predictions: no need to read the answers to every older one.
            ModelOutput.prediction_id >= min(prediction_ids),
        )
        .order_by(ModelOutput.created_at, ModelOutput.id)
    )
    return {pid: (top, confidence) for pid, top, confidence in db.session.execute(statement) if pid in prediction_ids}


def thumbnails(prediction_ids: list[int]) -> list[bytes]:
    """The kept images of these predictions, in that order."""
    rows = db.session.execute(
        select(HistoryEntry.id, HistoryEntry.thumbnail).where(HistoryEntry.id.in_(prediction_ids))
    ).all()
    by_id = dict(rows)
    return [by_id[i] for i in prediction_ids]


def build(
    size: int, features: Callable[[list[int]], np.ndarray], model_id: int | None, seed: int | None = None
) -> LabelRound:
    """Build and store a new round of at most `size` items; the newest round is the one people label."""
    items = queue.build_round(candidates(), size, features, np.random.default_rng(seed))
    label_round = LabelRound(created_at=datetime.now(UTC), model_id=model_id, requested=size)
    db.session.add(label_round)
    db.session.flush()
    db.session.add_all(
        LabelItem(
            round_id=label_round.id, prediction_id=item.prediction_id, position=i, lane=item.lane, score=item.score
        )
        for i, item in enumerate(items)
    )
    db.session.commit()
    return label_round


def latest_round() -> LabelRound | None:
    return db.session.scalar(select(LabelRound).order_by(LabelRound.id.desc()).limit(1))


def round_items(label_round: LabelRound, viewer: Viewer | None = None) -> list[tuple[LabelItem, HistoryEntry]]:
    """A round's items the viewer may label, in order, each with its prediction."""
    visible = prediction_history.query(viewer=viewer).order_by(None).with_only_columns(HistoryEntry.id)
    statement = (
        select(LabelItem, HistoryEntry)
        .join(HistoryEntry, HistoryEntry.id == LabelItem.prediction_id)
        .options(undefer(HistoryEntry.probabilities))
        .where(LabelItem.round_id == label_round.id, LabelItem.prediction_id.in_(visible))
        .order_by(LabelItem.position)
    )
    return [tuple(pair) for pair in db.session.execute(statement)]


def next_item(viewer: Viewer, after: int = -1) -> tuple[LabelItem, HistoryEntry] | None:
    """The viewer's next unlabelled item of the newest round, after position `after` (skipping)."""
    label_round = latest_round()
    if label_round is None:
        return None
    pending = (pair for pair in round_items(label_round, viewer) if pair[0].labelled_at is None)
    return next((pair for pair in pending if pair[0].position > after), None)


def progress(viewer: Viewer) -> tuple[int, int]:
    """(labelled, total) of the newest round's items the viewer may label."""
    label_round = latest_round()
    items = round_items(label_round, viewer) if label_round else []
    return sum(item.labelled_at is not None for item, _row in items), len(items)


def _verdict(row: HistoryEntry, answer: str) -> tuple[str, str | None]:
    """An answer (a class name, or "none") as feedback: right, wrong with the class, or none."""
    if answer == NONE_ANSWER:
        return "none", None
    if row.class_names is None or answer not in row.class_names:
        raise HistoryError(f"{answer[:100]!r} is not one of the classes of the model that made this prediction")
    return ("right", None) if answer == row.top_class else ("wrong", answer)


def answer(item_id: int, answer_given: str, viewer: Viewer) -> HistoryEntry:
    """Record a label on a round's item as `viewer`: the prediction's feedback, or a second
    opinion when someone else marked it already. Someone else's item is "not found"."""
    item = db.session.get(LabelItem, item_id)
    if item is None:
        raise PredictionNotFound(f"no label request with id {item_id}")
    row = prediction_history.get(item.prediction_id, viewer)
    verdict, correct_class = _verdict(row, answer_given)
    if row.feedback is not None and (row.feedback_user_id, row.feedback_author) != (viewer.user_id, viewer.name):
        label = row.top_class if verdict == "right" else correct_class
        _vote(row.id, "label", verdict, label, viewer)
    else:
        prediction_history.set_feedback(row.id, verdict, correct_class, viewer)
    item.labelled_at, item.labelled_by = datetime.now(UTC), viewer.name
    db.session.commit()
    return row


def _vote(prediction_id: int, stance: str, verdict: str, label: str | None, viewer: Viewer) -> None:
    db.session.add(
        LabelVote(
            prediction_id=prediction_id,
            stance=stance,
            verdict=verdict,
            label=label,
            user_id=viewer.user_id,
            author=viewer.name,
            created_at=datetime.now(UTC),
        )
    )


def held(viewer: Viewer | None = None) -> list[tuple[HistoryEntry, Review]]:
    """Held feedback on predictions the viewer may see, oldest first, with why it is held."""
    waiting = {pid: review for pid, review in reviews().items() if review.status == HELD}
    visible = (
        prediction_history.query(viewer=viewer).where(HistoryEntry.id.in_(list(waiting))).order_by(HistoryEntry.id)
    )
    return [(row, waiting[row.id]) for row in db.session.scalars(visible)] if waiting else []


def decide(prediction_id: int, stance: str, viewer: Viewer) -> HistoryEntry:
    """An operator confirms or rejects a prediction's feedback as it stands now."""
    if stance not in ("confirm", "reject"):
        raise HistoryError("the decision is 'confirm' or 'reject'")
    if not viewer.operator:
        raise HistoryError("only an operator confirms or rejects held feedback")
    row = prediction_history.get(prediction_id, viewer)
    if row.feedback is None:
        raise HistoryError(f"prediction #{row.id} has no feedback to {stance}")
    _vote(row.id, stance, row.feedback, row.labelled_class, viewer)
    db.session.commit()
    return row


def export_confirmed(directory: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Export the confirmed feedback only (prediction_history.export_feedback); the counts per
    class written, and how many were held back, by state."""
    states = reviews()
    held_back = {pid for pid, review in states.items() if review.status != CONFIRMED}
    counts = prediction_history.export_feedback(directory, held_back)
    by_state: dict[str, int] = {}
    for pid in held_back:
        by_state[states[pid].status] = by_state.get(states[pid].status, 0) + 1
    return counts, by_state


@dataclass(frozen=True)
class LaneSummary:
    lane: str
    items: int
    labelled: int
    right: int
    none: int


def summary(label_round: LabelRound) -> list[LaneSummary]:
    """Per lane of a round: items, labelled, labelled right (the random lane's right/labelled is
    an unbiased estimate of the served accuracy) and "none of these" (the out-of-scope lane's
    are evidence for the OOD threshold, not training data: the export leaves them out)."""
    statement = (
        select(
            LabelItem.lane,
            func.count(),
            func.count(LabelItem.labelled_at),
            func.count(HistoryEntry.feedback).filter(HistoryEntry.feedback == "right"),
            func.count(HistoryEntry.feedback).filter(HistoryEntry.feedback == "none"),
        )
        .join(HistoryEntry, HistoryEntry.id == LabelItem.prediction_id)
        .where(LabelItem.round_id == label_round.id)
        .group_by(LabelItem.lane)
    )
    found = {lane: LaneSummary(lane, *counts) for lane, *counts in db.session.execute(statement)}
    return [found[lane] for lane in queue.LANES if lane in found]
