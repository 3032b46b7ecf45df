"""Privacy defaults at the request edge: uploads stay in memory, the session cookie is Secure over
HTTPS, personal pages are not stored by any cache, and the prediction history is purged past its
retention period (at most once an hour).
"""

from __future__ import annotations

import functools
import io
import threading
import time
from collections.abc import Callable

from flask import Flask, Request, current_app, make_response, request
from flask.sessions import SecureCookieSessionInterface
from sqlalchemy.exc import SQLAlchemyError

import prediction_history
from database import db

PURGE_INTERVAL_S = 3600


class InMemoryRequest(Request):
    """Werkzeug spools multipart files over 500 KB to a temporary file; here every uploaded file
    stays in memory. MAX_CONTENT_LENGTH bounds what one request can hold."""

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()


class HttpsAwareSessionInterface(SecureCookieSessionInterface):
    """The session cookie is marked Secure whenever the request came over HTTPS (or SESSION_COOKIE_SECURE),
    and is then named `__Host-session`: no subdomain can set or shadow it. Over HTTP (a laptop,
    loopback) it stays `session`, which browsers accept there."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(super().get_cookie_secure(app) or request.is_secure)

    def get_cookie_name(self, app: Flask) -> str:
        name = super().get_cookie_name(app)
        # The prefix's own rules: Secure, Path=/ and no Domain, or the browser drops the cookie.
        host_only = self.get_cookie_domain(app) is None and self.get_cookie_path(app) == "/"
        return f"__Host-{name}" if self.get_cookie_secure(app) and host_only else name


def no_store(view: Callable) -> Callable:
    """A view whose answer is someone's own (their results, history, photos): no shared cache
    keeps it and the browser does not store it (nor show it again from Back after log-out)."""

    @functools.wraps(view)
    def personal(*args, **kwargs):
        response = make_response(view(*args, **kwargs))
        response.headers["Cache-Control"] = "private, no-store"
        return response

    return personal


class HistoryPurge:
    """Deletes predictions older than RETENTION_DAYS from a request, at most once per interval per process."""

    def __init__(self, interval_s: float = PURGE_INTERVAL_S):
        self.interval_s = interval_s
        self._last: float | None = None
        self._lock = threading.Lock()

    def maybe_run(self) -> None:
        days = current_app.config["RETENTION_DAYS"]
        if not days:
            return
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval_s:
            return
        if not self._lock.acquire(blocking=False):
            return  # another thread of this worker is purging now
        try:
            self._last = now
            removed = prediction_history.purge(float(days))
        except SQLAlchemyError as exc:
            # A purge that fails (no schema yet, a locked database) must not fail the request.
            db.session.rollback()
            current_app.logger.warning("retention purge failed: %s", exc)
        else:
            if removed:
                current_app.logger.info("retention: deleted %d predictions older than %s days", removed, days)
        finally:
            self._lock.release()


def init_app(app: Flask) -> None:
    app.request_class = InMemoryRequest
    app.session_interface = HttpsAwareSessionInterface()
    purge = app.extensions["history_purge"] = HistoryPurge()
    app.before_request(purge.maybe_run)
