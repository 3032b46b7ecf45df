"""The Models page's champion-and-challenger part: what it shows (everyone: champion, challenger,
mode, share; operators: the comparison with a verdict per check) and the operators' promote and
rollback buttons (CSRF-protected forms)."""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, flash, redirect, url_for

import model_store
from app_errors import AppError
from database import db
from model_store import ModelVersion
from rollout import state as rollout_state
from web.auth import current_viewer, require_operator

bp = Blueprint("rollout", __name__)


def rollout_view(operator: bool) -> dict:
    """What the Models page shows: champion, challenger, mode and share for everyone; the
    comparison (and the buttons) for operators only."""
    state = rollout_state.get_state()
    champion = model_store.get_active()
    challenger = db.session.get(ModelVersion, state.challenger_id) if state.challenger_id else None
    view = {
        "champion": rollout_state.label(champion),
        "challenger": rollout_state.label(challenger) if state.mode != "off" else None,
        "mode": state.mode,
        "share": state.share,
        "comparison": rollout_state.compare_current(state) if operator else None,
    }
    db.session.rollback()  # the state row may have been made here: a page view changes nothing
    return view


def _operator_action(action: Callable[[str], str]):
    require_operator("Promoting or rolling back a challenger")
    try:
        flash(action(current_viewer().name or "operator"))
    except AppError as exc:
        flash(exc.message)
    return redirect(url_for("pages.models"))


@bp.post("/models/promote")
def promote():
    def act(actor: str) -> str:
        row = rollout_state.promote(actor, "promoted from the Models page")
        return f"{rollout_state.label(row)} is now the champion."

    return _operator_action(act)


@bp.post("/models/rollback")
def rollback():
    def act(actor: str) -> str:
        rollout_state.rollback(actor, "rolled back from the Models page")
        return "The challenger is rolled back: the champion answers every request."

    return _operator_action(act)
