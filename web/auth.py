"""Who is asking: log-in and log-out pages, Flask-Login set-up, API keys as bearer tokens, and the
anonymous owner cookie that owns an anonymous visitor's predictions.

The session cookie names an account by its session token (accounts.py), so logging out, a new
password or role, disabling or deleting the account ends every session of it. API keys are
accepted only where scripts go (`/api/v1` and `/metrics`): on the pages a key is no one, so it
cannot fetch a form's CSRF token and act through the forms.

An anonymous visitor's predictions belong to a random id in its own cookie, kept as long as the
predictions are (RETENTION_DAYS): logging in or out does not lose it, and logging in moves those
predictions to the account (or deletes them, if the visitor chooses).

Anonymous use (ALLOW_ANONYMOUS for the pages, ALLOW_ANONYMOUS_API for the API) is on unless set
to false; left at its default, a server bound to an address other than loopback refuses to start.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from datetime import timedelta

from flask import Blueprint, Flask, current_app, flash, g, redirect, render_template, request, session, url_for
from flask_login import current_user, login_user, logout_user

import accounts
import prediction_history
from accounts import AccountLocked, Lockout, Viewer
from web.credentials import metrics_token_sent
from web.errors import STATUS_BY_CODE, WebError
from web.extensions import login_manager
from web.limits import login_limit

bp = Blueprint("auth", __name__)

ANONYMOUS_COOKIE = "anonymous_owner"
_ANONYMOUS_ID = re.compile(r"[A-Za-z0-9_-]{32}")  # what secrets.token_urlsafe(24) makes
# Browsers keep a cookie at most 400 days: the cookie's age when predictions are kept until deleted.
MAX_COOKIE_DAYS = 400
# Where bearer API keys are accepted: the API's blueprint and the metrics endpoint.
KEY_BLUEPRINTS = ("api",)
KEY_ENDPOINTS = ("ops.metrics",)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
# gunicorn.conf.py puts the addresses it binds here before the workers build the app.
BIND_ENV = "SERVER_BIND"


@login_manager.user_loader
def load_user(session_token: str):
    """The account of a session cookie: its current session token, and not disabled."""
    return accounts.user_for_session(session_token)


@login_manager.request_loader
def load_user_from_key(req):
    """`Authorization: Bearer KEY` with a live API key, on the API and /metrics only: the request
    speaks for the key's user. How the key fared is left in `g.api_key` (see api_key_state)."""
    authorization = req.authorization
    if not (authorization and authorization.type == "bearer" and authorization.token):
        return None
    if req.blueprint not in KEY_BLUEPRINTS and req.endpoint not in KEY_ENDPOINTS:
        g.api_key = "ignored"
        return None
    user = accounts.user_for_key(authorization.token)
    g.api_key = "live" if user else "refused"
    return user


def api_key_state() -> str | None:
    """How this request's bearer token fared as an API key: "live"; "refused" (unknown, revoked,
    or its account disabled; on /metrics it may still be METRICS_TOKEN); "ignored" (sent to a
    page, where keys are not accepted); None when no bearer token was looked at (none sent, or
    the session cookie's account answered first)."""
    _ = current_user.is_authenticated  # loads the user, which sets the state
    return g.get("api_key")


def anonymous_allowed(setting: str) -> bool:
    """Anonymous use is on unless the setting is false (None means "on by default")."""
    return current_app.config[setting] is not False


def current_viewer(create_session: bool = False) -> Viewer:
    """The account the request speaks for, else its anonymous owner id (made when asked: only a
    visitor who classifies gets one, and the cookie's life starts again with each prediction)."""
    if current_user.is_authenticated:
        return Viewer.of(current_user)
    owner = _anonymous_owner()
    if create_session:
        owner = owner or secrets.token_urlsafe(24)
        g.set_anonymous_owner = owner
    return Viewer(session_id=owner)


def _anonymous_owner() -> str | None:
    """The anonymous owner id of this request's cookie, when it is one this app made."""
    if g.get("clear_anonymous_owner"):
        return None
    value = g.get("set_anonymous_owner") or request.cookies.get(ANONYMOUS_COOKIE, "")
    return value if _ANONYMOUS_ID.fullmatch(value) else None


def _anonymous_owner_cookie(response):
    """after_request: (re)write the anonymous owner cookie to last as long as the predictions, or delete it."""
    interface = current_app.session_interface
    options = {
        "httponly": True,
        "secure": interface.get_cookie_secure(current_app),
        "samesite": interface.get_cookie_samesite(current_app),
    }
    if g.get("clear_anonymous_owner"):
        response.delete_cookie(ANONYMOUS_COOKIE, **options)
    elif g.get("set_anonymous_owner"):
        days = current_app.config["RETENTION_DAYS"] or MAX_COOKIE_DAYS
        max_age = int(min(float(days), MAX_COOKIE_DAYS) * 86400)
        response.set_cookie(ANONYMOUS_COOKIE, g.set_anonymous_owner, max_age=max_age, **options)
    return response


def require_page_login():
    """before_request for the pages: a log-in prompt when anonymous use is off."""
    if not current_user.is_authenticated and not anonymous_allowed("ALLOW_ANONYMOUS"):
        return login_manager.unauthorized()
    return None


def require_api_caller() -> None:
    """before_request for the API: a key that is unknown or revoked is refused, never taken as anonymous."""
    if current_user.is_authenticated:
        return
    if request.authorization is not None:
        raise WebError("The API key is unknown or revoked.", "unauthorized")
    if not anonymous_allowed("ALLOW_ANONYMOUS_API"):
        raise WebError("This server needs an API key: send 'Authorization: Bearer KEY'.", "unauthorized")


def may_read_metrics() -> bool:
    """An operator's session or key, the bearer METRICS_TOKEN, or (METRICS_ALLOW_LOOPBACK) a loopback client."""
    if current_user.is_authenticated and current_user.is_operator:
        return True
    authorization = request.authorization
    if current_app.config.get("METRICS_TOKEN") and authorization and authorization.type == "bearer":
        return metrics_token_sent()
    return bool(current_app.config["METRICS_ALLOW_LOOPBACK"]) and _is_loopback(request.remote_addr or "")


def is_operator() -> bool:
    return bool(current_user.is_authenticated and current_user.is_operator)


def require_operator(what: str) -> None:
    """Refuse anyone but an operator: 401 (log in) when anonymous, 403 to a member, whom
    logging in again would not help."""
    if is_operator():
        return
    if current_user.is_authenticated:
        raise WebError(f"{what} is for operators; your account is a member's.", "forbidden")
    raise WebError(f"{what} is for operators: log in as one.", "unauthorized")


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_problem(config, binds: str) -> str | None:
    """Why serving on `binds` (comma-separated host:port or unix:path) is refused, or None."""
    defaults_left = [name for name in ("ALLOW_ANONYMOUS", "ALLOW_ANONYMOUS_API") if config[name] is None]
    network_binds = [bind for bind in binds.split(",") if bind and not bind.startswith("unix:")]
    exposed = [bind for bind in network_binds if not _is_loopback(_host(bind))]
    if not (exposed and defaults_left):
        return None
    return (
        f"refusing to serve on {', '.join(exposed)}: anonymous access is on by default, so anyone who can reach "
        f"this address could classify and keep photos here. Create accounts (`flask users create NAME --role "
        f"operator`) and set FLASK_ALLOW_ANONYMOUS=false and FLASK_ALLOW_ANONYMOUS_API=false, or set "
        f"{' and '.join(defaults_left)} to true on purpose (see README, Security and privacy)."
    )


def _host(bind: str) -> str:
    return bind.rsplit(":", 1)[0] if bind.count(":") == 1 or bind.startswith("[") else bind


@bp.route("/login", methods=["GET", "POST"])
@login_limit
def login():
    owner = _anonymous_owner()
    anonymous_predictions = prediction_history.count_owned(Viewer(session_id=owner)) if owner else 0
    if request.method == "GET":
        return render_template("login.html", anonymous_predictions=anonymous_predictions)
    config = current_app.config
    lockout = Lockout(int(config["LOGIN_LOCKOUT_FAILURES"]), timedelta(minutes=float(config["LOGIN_LOCKOUT_MINUTES"])))
    try:
        user = accounts.authenticate(request.form.get("username", ""), request.form.get("password", ""), lockout)
    except AccountLocked as exc:
        return render_template(
            "login.html", error=str(exc), anonymous_predictions=anonymous_predictions
        ), STATUS_BY_CODE[exc.code]
    if user is None:
        error = "Unknown user name or wrong password."
        page = render_template("login.html", error=error, anonymous_predictions=anonymous_predictions)
        return page, STATUS_BY_CODE["unauthorized"]
    session.clear()  # no session state carries over a change of who is logged in
    login_user(user)
    flash(f"Logged in as {user.name}.")
    if owner:
        _take_over_anonymous_predictions(owner, user, request.form.get("anonymous_predictions") == "delete")
    return redirect(url_for("pages.index"))


def _take_over_anonymous_predictions(owner: str, user: accounts.User, delete: bool) -> None:
    """Predictions the visitor made before logging in move to the account, or are deleted if asked."""
    anonymous = Viewer(session_id=owner)
    if delete:
        removed = prediction_history.forget(anonymous)
        if removed:
            flash(f"The {removed} predictions you made before logging in are deleted, as you asked.")
    else:
        moved = prediction_history.adopt(anonymous, Viewer.of(user))
        if moved:
            flash(f"The {moved} predictions you made before logging in are now in your account's history.")
    g.clear_anonymous_owner = True


@bp.post("/logout")
def logout():
    """Log out everywhere: the account's session token changes, so every cookie of it ends."""
    if current_user.is_authenticated:
        accounts.end_sessions(current_user._get_current_object())
    logout_user()
    session.clear()
    flash("Logged out, on every device.")
    return redirect(url_for("pages.index"))


def init_app(app: Flask) -> None:
    """The refusal to serve an exposed anonymous app, the password hashing method, and the viewer
    in every template."""
    problem = exposure_problem(app.config, os.environ.get(BIND_ENV, ""))
    if problem:
        raise RuntimeError(problem)
    try:
        accounts.set_password_method(app.config["PASSWORD_HASH_METHOD"], allow_weaker=app.testing)
    except ValueError as error:
        raise RuntimeError(str(error)) from None
    app.after_request(_anonymous_owner_cookie)
    app.context_processor(lambda: {"viewer": current_viewer(), "is_operator": is_operator()})
