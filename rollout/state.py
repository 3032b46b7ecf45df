"""Champion and challenger in the database: the rollout state every worker follows, the
append-only record of who served when, and the comparison read from the history.

The champion is the registry's active version (model_store). `RolloutState` (one row) names at
most one challenger, the mode (`off`, `shadow`, `canary`), the canary share, the shadow sample
rate and the criteria. Every change goes through a function here that also appends a
`RolloutEvent` (time, actor, action, from and to, reason, the state it left and a snapshot of the
comparison), so "which version answered at time T" is read from the events (`served_at`).
The judging itself is rollout_checks.py's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text, select, update
from sqlalchemy.orm import Mapped, mapped_column

import model_store
from app_errors import AppError
from database import db
from model_store import ModelVersion
from prediction_history import HistoryEntry, ModelOutput, RolloutObservation
from rollout import checks as rollout_checks
from rollout.checks import Action, Answer, Criteria, Observation, Progress

MODES = ("off", "shadow", "canary")
STATE_ID = 1
SYSTEM = "system"


class RolloutError(AppError):
    """A rollout change that cannot be made; the message says why."""

    code = "registry"


class RolloutState(db.Model):
    """The one row every worker follows (see the module docstring)."""

    __tablename__ = "rollout_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    challenger_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    mode: Mapped[str] = mapped_column(String(10), nullable=False, default="off")
    share: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    sample: Mapped[float] = mapped_column(Float, nullable=False, default=1.0)
    auto_step: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    auto_promote: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    criteria: Mapped[dict] = mapped_column(JSON, nullable=False, default=dict)
    # Where the comparison window starts: the start of the shadow or canary.
    window_start: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Challenger answers counted at the last check; checks run every `check_every` more.
    checked_upto: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    failed_checks: Mapped[int] = mapped_column(Integer, nullable=False, default=0)  # in a row
    # The last check: when, at how many challenger requests, and where the clean run began.
    last_check: Mapped[dict | None] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)


class RolloutEvent(db.Model):
    """One change of who serves: never updated or deleted. Ids and labels ("name vN") are kept
    without foreign keys so the record outlives a deleted version."""

    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)
    actor: Mapped[str] = mapped_column(String(100), nullable=False)
    # activate | start-shadow | start-canary | step | promote | rollback | abort
    action: Mapped[str] = mapped_column(String(20), nullable=False)
    from_model_id: Mapped[int | None] = mapped_column(Integer)
    from_label: Mapped[str | None] = mapped_column(String(120))
    to_model_id: Mapped[int | None] = mapped_column(Integer)
    to_label: Mapped[str | None] = mapped_column(String(120))
    # The state the event left.
    champion_id: Mapped[int | None] = mapped_column(Integer)
    champion_label: Mapped[str | None] = mapped_column(String(120))
    challenger_id: Mapped[int | None] = mapped_column(Integer)
    challenger_label: Mapped[str | None] = mapped_column(String(120))
    mode: Mapped[str] = mapped_column(String(10), nullable=False)
    share: Mapped[float] = mapped_column(Float, nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    snapshot: Mapped[dict | None] = mapped_column(JSON)

    def to_dict(self) -> dict:
        return {
            "time": self.created_at.isoformat(),
            "actor": self.actor,
            "action": self.action,
            "from": self.from_label,
            "to": self.to_label,
            "champion": self.champion_label,
            "challenger": self.challenger_label,
            "mode": self.mode,
            "share": self.share,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Plan:
    """What a worker follows, read on its registry poll."""

    mode: str = "off"
    challenger_id: int | None = None
    share: float = 0.0
    sample: float = 1.0


def label(row: ModelVersion | None) -> str | None:
    return f"{row.name} v{row.version} (id {row.id})" if row is not None else None


def _now() -> datetime:
    return datetime.now(UTC)


def get_state(for_update: bool = False) -> RolloutState:
    """The state row, made (off, no challenger) on first use."""
    statement = select(RolloutState).where(RolloutState.id == STATE_ID)
    row = db.session.scalar(statement.with_for_update() if for_update else statement)
    if row is None:
        row = RolloutState(id=STATE_ID, mode="off", share=0.0, sample=1.0, criteria={}, updated_at=_now())
        row.auto_step = row.auto_promote = False
        row.checked_upto = row.failed_checks = 0
        db.session.add(row)
        db.session.flush()
    return row


def read_plan() -> Plan:
    """The state as workers follow it (no row yet: off)."""
    row = db.session.get(RolloutState, STATE_ID)
    if row is None or row.mode == "off" or row.challenger_id is None:
        return Plan()
    return Plan(row.mode, row.challenger_id, row.share, row.sample)


def criteria_of(state: RolloutState) -> Criteria:
    return Criteria.from_dict(state.criteria)


def _append(action: str, actor: str, source, target, reason: str | None, snapshot: dict | None) -> RolloutEvent:
    state = get_state()
    champion = model_store.get_active()
    challenger = db.session.get(ModelVersion, state.challenger_id) if state.challenger_id else None
    event = RolloutEvent(
        created_at=_now(),
        actor=actor,
        action=action,
        from_model_id=source.id if source else None,
        from_label=label(source),
        to_model_id=target.id if target else None,
        to_label=label(target),
        champion_id=champion.id if champion else None,
        champion_label=label(champion),
        challenger_id=challenger.id if challenger else None,
        challenger_label=label(challenger),
        mode=state.mode,
        share=state.share,
        reason=reason,
        snapshot=snapshot,
    )
    db.session.add(event)
    return event


def _reset(state: RolloutState, mode: str, challenger_id: int | None, share: float = 0.0) -> None:
    state.mode, state.challenger_id, state.share = mode, challenger_id, share
    state.window_start = _now() if mode != "off" else None
    state.checked_upto = state.failed_checks = 0
    state.last_check = None
    state.updated_at = _now()


def _commit() -> None:
    try:
        db.session.commit()
    except Exception:
        db.session.rollback()
        raise


def activate(model_id: int, actor: str, reason: str | None = None) -> ModelVersion:
    """Make a version the champion at once (`flask models activate`), ending any challenger."""
    row = model_store.get_model(model_id)
    model_store.verify(row)
    state = get_state(for_update=True)
    previous = model_store.get_active()
    model_store.set_active(row)
    _reset(state, "off", None)
    _append("activate", actor, previous, row, reason, None)
    _commit()
    return row


def delete(model_id: int) -> None:
    """Delete an inactive version (`flask models delete`) that is not the running challenger:
    deleting it would leave the state naming a canary no worker serves, and the audit would
    name it for requests the champion answered."""
    state = get_state()
    if state.mode != "off" and state.challenger_id == model_id:
        db.session.rollback()  # the state row may have been made here
        raise RolloutError(
            f"model {model_id} is the challenger ({state.mode}): roll it back (`flask models rollback`) first"
        )
    model_store.delete(model_id)


def record_activation(row: ModelVersion, actor: str, reason: str) -> None:
    """Record a version made active outside this module (an import with --activate, or the
    registry's first version), ending any challenger."""
    _reset(get_state(for_update=True), "off", None)
    _append("activate", actor, None, row, reason, None)
    _commit()


def _challenger(model_id: int) -> tuple[RolloutState, ModelVersion, ModelVersion]:
    row = model_store.get_model(model_id)
    model_store.verify(row)
    champion = model_store.get_active()
    if champion is None:
        raise RolloutError("there is no champion: activate a version first")
    if champion.id == row.id:
        raise RolloutError(f"model {row.id} is the champion; a challenger must be another version")
    if tuple(champion.class_names) != tuple(row.class_names):
        raise RolloutError("a challenger must have the champion's classes, in the same order, to be compared")
    return get_state(for_update=True), champion, row


def start_shadow(model_id: int, sample: float, actor: str, criteria: Criteria | None = None) -> RolloutState:
    """The challenger scores a `sample` of requests off the response path; nobody sees its answers."""
    if not 0 < sample <= 1:
        raise RolloutError("the sample rate is a fraction in (0, 1]")
    state, champion, row = _challenger(model_id)
    _reset(state, "shadow", row.id)
    state.sample, state.criteria = sample, (criteria or criteria_of(state)).to_dict()
    state.auto_step = state.auto_promote = False
    _append("start-shadow", actor, champion, row, f"sample {sample:g}", None)
    _commit()
    return state


def start_canary(
    model_id: int,
    share: float,
    actor: str,
    auto_step: bool = False,
    auto_promote: bool = False,
    criteria: Criteria | None = None,
) -> RolloutState:
    """The challenger answers `share` % of requests (by the upload's hash); the champion scores those off the path."""
    if not 0 < share <= 100:
        raise RolloutError("the share is a percentage in (0, 100]")
    state, champion, row = _challenger(model_id)
    _reset(state, "canary", row.id, share)
    state.auto_step, state.auto_promote = auto_step, auto_promote
    state.criteria = (criteria or criteria_of(state)).to_dict()
    extras = [name for name, on in (("auto-step", auto_step), ("auto-promote", auto_promote)) if on]
    _append("start-canary", actor, champion, row, f"share {share:g}%" + "".join(f", {x}" for x in extras), None)
    _commit()
    return state


def _current(state: RolloutState) -> tuple[ModelVersion, ModelVersion]:
    if state.mode == "off" or state.challenger_id is None:
        raise RolloutError("there is no challenger: start a shadow or a canary first")
    return model_store.get_active(), model_store.get_model(state.challenger_id)


def step(share: float, actor: str, reason: str | None = None, snapshot: dict | None = None) -> RolloutState:
    """Change a canary's share (the comparison window goes on)."""
    state = get_state(for_update=True)
    champion, challenger = _current(state)
    if state.mode != "canary":
        raise RolloutError("only a canary has a share")
    state.share, state.updated_at = share, _now()
    _append("step", actor, champion, challenger, reason or f"share {share:g}%", snapshot)
    _commit()
    return state


def promote(actor: str, reason: str | None = None, snapshot: dict | None = None) -> ModelVersion:
    """Make the challenger the champion; the old champion leaves (no challenger afterwards)."""
    state = get_state(for_update=True)
    champion, challenger = _current(state)
    snapshot = snapshot if snapshot is not None else compare_current(state)
    model_store.set_active(challenger)
    _reset(state, "off", None)
    _append("promote", actor, champion, challenger, reason, snapshot)
    _commit()
    return challenger


def rollback(actor: str, reason: str | None = None, snapshot: dict | None = None, action: str = "rollback") -> None:
    """End the shadow or canary: the champion answers everything again (`abort`: ended, not judged)."""
    state = get_state(for_update=True)
    champion, challenger = _current(state)
    snapshot = snapshot if snapshot is not None else compare_current(state)
    _reset(state, "off", None)
    _append(action, actor, challenger, champion, reason, snapshot)
    _commit()


def events(until: datetime | None = None) -> list[RolloutEvent]:
    statement = select(RolloutEvent).order_by(RolloutEvent.created_at, RolloutEvent.id)
    if until is not None:
        statement = statement.where(RolloutEvent.created_at <= until)
    return list(db.session.scalars(statement))


@dataclass(frozen=True)
class Served:
    """Who served at a moment: the champion, the challenger and how it took part; with an
    image's sha256, the version that answered that image."""

    at: str
    champion_id: int | None
    champion: str | None
    challenger_id: int | None
    challenger: str | None
    mode: str
    share: float
    answered_by_id: int | None = None
    answered_by: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def served_at(when: datetime, image_sha256: str | None = None) -> Served:
    """Which version answered at `when`, from the events up to then. Before the first event the
    champion is the one the first event replaced (or, with no event at all, today's active one).
    A single-image request's sha256 says which of champion and challenger answered it."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    statement = select(RolloutEvent).where(RolloutEvent.created_at <= when)
    last = db.session.scalar(statement.order_by(RolloutEvent.created_at.desc(), RolloutEvent.id.desc()).limit(1))
    if last is not None:
        served = Served(
            when.isoformat(),
            last.champion_id,
            last.champion_label,
            last.challenger_id,
            last.challenger_label,
            last.mode,
            last.share,
        )
    else:
        first = db.session.scalar(select(RolloutEvent).order_by(RolloutEvent.created_at, RolloutEvent.id).limit(1))
        if first is not None:
            champion_id = first.champion_id if first.action not in ("activate", "promote") else first.from_model_id
            champion_label = first.champion_label if first.action not in ("activate", "promote") else first.from_label
        else:
            active = model_store.get_active()
            champion_id, champion_label = (active.id, label(active)) if active else (None, None)
        served = Served(when.isoformat(), champion_id, champion_label, None, None, "off", 0.0)
    if image_sha256 is None:
        return served
    canary = served.mode == "canary" and rollout_checks.goes_to_challenger(image_sha256, served.share)
    if canary:
        return Served(**{**asdict(served), "answered_by_id": served.challenger_id, "answered_by": served.challenger})
    return Served(**{**asdict(served), "answered_by_id": served.champion_id, "answered_by": served.champion})


def window_rows(state: RolloutState, champion_id: int) -> tuple[list[Answer], list[Observation]]:
    """Every answer and observation of the champion and the challenger since the window started."""
    ids = (champion_id, state.challenger_id)
    start = state.window_start
    history = db.session.execute(
        select(
            HistoryEntry.id,
            HistoryEntry.model_id,
            HistoryEntry.top_class,
            HistoryEntry.decision,
            HistoryEntry.confidence,
            HistoryEntry.ood_score,
            HistoryEntry.feedback,
            HistoryEntry.correct_class,
        ).where(HistoryEntry.created_at >= start, HistoryEntry.model_id.in_(ids))
    ).all()
    labels = {row.id: _labelled(row.feedback, row.top_class, row.correct_class) for row in history}
    answers = [
        Answer(r.id, r.model_id, r.top_class, r.decision, r.confidence, r.ood_score, labels[r.id]) for r in history
    ]
    outputs = db.session.execute(
        select(
            ModelOutput.prediction_id,
            ModelOutput.model_id,
            ModelOutput.top_class,
            ModelOutput.decision,
            ModelOutput.confidence,
            ModelOutput.ood_score,
        ).where(ModelOutput.created_at >= start, ModelOutput.model_id.in_(ids))
    ).all()
    answers += [Answer(r[0], r[1], r[2], r[3], r[4], r[5], labels.get(r[0])) for r in outputs]
    observed = db.session.execute(
        select(
            RolloutObservation.model_id,
            RolloutObservation.answered,
            RolloutObservation.latency_ms,
            RolloutObservation.error,
        ).where(RolloutObservation.created_at >= start, RolloutObservation.model_id.in_(ids))
    ).all()
    return answers, [Observation(*row) for row in observed]


def _labelled(feedback: str | None, top_class: str, correct_class: str | None) -> str | None:
    """The class people confirmed (as HistoryEntry.labelled_class), from plain columns."""
    return {"right": top_class, "wrong": correct_class}.get(feedback or "")


def compare_current(state: RolloutState | None = None) -> dict | None:
    """The comparison of champion and challenger on the current window (None without a challenger)."""
    state = state or get_state()
    champion = model_store.get_active()
    if state.mode == "off" or state.challenger_id is None or champion is None:
        return None
    answers, observations = window_rows(state, champion.id)
    return comparison(state, champion.id, answers, observations)


def comparison(state: RolloutState, champion_id: int, answers: list[Answer], observations: list[Observation]) -> dict:
    """Both versions' summaries, the checks with their verdicts and the paired accuracy, as JSON."""
    criteria = criteria_of(state)
    champion, challenger, paired = rollout_checks.windows(answers, observations, champion_id, state.challenger_id)
    checks = rollout_checks.run_checks(champion, challenger, paired, criteria)
    accuracy = rollout_checks.paired_accuracy(paired, criteria.promote_confidence)
    return {
        "mode": state.mode,
        "share": state.share,
        "sample": state.sample,
        "window_start": state.window_start.isoformat() if state.window_start else None,
        "champion": {"id": champion_id, **champion.summary()},
        "challenger": {"id": state.challenger_id, **challenger.summary()},
        "paired": {
            "requests": len(paired),
            "agreement": paired.agreement(),
            "confident_conflicts": paired.confident_conflicts(),
        },
        "accuracy": asdict(accuracy),
        "non_inferior": rollout_checks.non_inferior(accuracy, criteria),
        "checks": [{**asdict(check), "verdict": check.verdict} for check in checks],
        "failed_checks_in_row": state.failed_checks,
    }


def challenger_answers(state: RolloutState) -> int:
    """Requests the challenger answered since the canary started."""
    return db.session.scalar(
        select(db.func.count())
        .select_from(HistoryEntry)
        .where(HistoryEntry.created_at >= state.window_start, HistoryEntry.model_id == state.challenger_id)
    )


def maybe_check() -> rollout_checks.Decision | None:
    """Run the canary's check when `check_every` more challenger requests came in since the last,
    and act on it (roll back, step, promote). Of several workers, the one that moves
    `checked_upto` first runs it; the others see the new value and do nothing."""
    state = get_state()
    if state.mode != "canary":
        db.session.rollback()
        return None
    criteria = criteria_of(state)
    counted = challenger_answers(state)
    due = state.checked_upto + criteria.check_every
    if counted < due:
        db.session.rollback()
        return None
    claimed = db.session.execute(
        update(RolloutState)
        .where(RolloutState.id == STATE_ID, RolloutState.checked_upto == state.checked_upto)
        .where(RolloutState.challenger_id == state.challenger_id, RolloutState.mode == "canary")
        .values(checked_upto=counted)
    ).rowcount
    if not claimed:
        db.session.rollback()
        return None
    db.session.commit()
    return _check(counted, criteria)


def _check(counted: int, criteria: Criteria) -> rollout_checks.Decision | None:
    state = get_state(for_update=True)
    champion = model_store.get_active()
    if state.mode != "canary" or champion is None:
        db.session.rollback()
        return None
    answers, observations = window_rows(state, champion.id)
    snapshot = comparison(state, champion.id, answers, observations)
    cham, chal, paired = rollout_checks.windows(answers, observations, champion.id, state.challenger_id)
    checks = rollout_checks.run_checks(cham, chal, paired, criteria)
    progress = Progress(state.failed_checks, (state.last_check or {}).get("clean_since", 0))
    decision = rollout_checks.decide(
        progress,
        checks,
        counted,
        state.share,
        criteria,
        state.auto_step,
        rollout_checks.paired_accuracy(paired, criteria.promote_confidence),
        state.auto_promote,
    )
    state.failed_checks = decision.progress.failed_in_row
    snapshot["failed_checks_in_row"] = state.failed_checks
    state.last_check = {"at": _now().isoformat(), "requests": counted, "clean_since": decision.progress.clean_since}
    if decision.action is Action.ROLLBACK:
        rollback(SYSTEM, decision.reason, snapshot)
    elif decision.action is Action.PROMOTE:
        promote(SYSTEM, decision.reason, snapshot)
    elif decision.action is Action.STEP:
        step(decision.share, SYSTEM, f"share {decision.share:g}%: {decision.reason}", snapshot)
    else:
        _commit()
    return decision
