"""Privacy at the request edge: personal pages are not stored by any cache, and the prediction
history is purged past its retention period (at most once an hour per process, see
prediction_history.HistoryPurge). The session cookie is web/sessions.py's; uploads held in memory
are web/inputs.py's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from flask import Flask, current_app, make_response
from sqlalchemy.exc import SQLAlchemyError

from database import db
from prediction_history import HistoryPurge


def no_store(view: Callable) -> Callable:
    """A view whose answer is someone's own (their results, history, photos): no shared cache
    keeps it and the browser does not store it (nor show it again from Back after log-out)."""

    @functools.wraps(view)
    def personal(*args, **kwargs):
        response = make_response(view(*args, **kwargs))
        response.headers["Cache-Control"] = "private, no-store"
        return response

    return personal


def purge_history_when_due() -> None:
    """before_request: delete predictions older than RETENTION_DAYS when this process's purge is due."""
    days = current_app.config["RETENTION_DAYS"]
    try:
        removed = current_app.extensions["history_purge"].maybe_run(days)
    except SQLAlchemyError as exc:
        # A purge that fails (no schema yet, a locked database) must not fail the request.
        db.session.rollback()
        current_app.logger.warning("retention purge failed: %s", exc)
        return
    if removed:
        current_app.logger.info("retention: deleted %d predictions older than %s days", removed, days)


def init_app(app: Flask) -> None:
    app.extensions["history_purge"] = HistoryPurge()
    app.before_request(purge_history_when_due)
