"""Who is asking: log-in and log-out pages, Flask-Login set-up, API keys as bearer tokens, and the
anonymous browser session that owns an anonymous visitor's predictions.

Anonymous use (ALLOW_ANONYMOUS for the pages, ALLOW_ANONYMOUS_API for the API) is on unless set
to false; left at its default, a server bound to an address other than loopback refuses to start.
"""

from __future__ import annotations

import ipaddress
import os
import secrets

from flask import Blueprint, Flask, current_app, flash, redirect, render_template, request, session, url_for
from flask_login import LoginManager, current_user, login_user, logout_user

import accounts
from accounts import Viewer
from web.credentials import metrics_token_sent
from web.errors import WebError
from web.limits import login_limit

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Log in to use the classifier."

ANONYMOUS_SESSION_KEY = "anonymous_id"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
# gunicorn.conf.py puts the addresses it binds here before the workers build the app.
BIND_ENV = "SERVER_BIND"


@login_manager.user_loader
def load_user(user_id: str):
    return accounts.get_user(int(user_id)) if user_id.isdecimal() else None


@login_manager.request_loader
def load_user_from_key(req):
    """`Authorization: Bearer KEY` with a live API key: the request speaks for the key's user."""
    authorization = req.authorization
    if authorization and authorization.type == "bearer" and authorization.token:
        return accounts.user_for_key(authorization.token)
    return None


def anonymous_allowed(setting: str) -> bool:
    """Anonymous use is on unless the setting is false (None means "on by default")."""
    return current_app.config[setting] is not False


def current_viewer(create_session: bool = False) -> Viewer:
    """The account the request speaks for, else its anonymous browser session (made when asked:
    only a visitor who classifies gets one, kept in the signed session cookie)."""
    if current_user.is_authenticated:
        return Viewer.of(current_user)
    if create_session and ANONYMOUS_SESSION_KEY not in session:
        session[ANONYMOUS_SESSION_KEY] = secrets.token_urlsafe(24)
    return Viewer(session_id=session.get(ANONYMOUS_SESSION_KEY))


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
    if request.method == "GET":
        return render_template("login.html")
    user = accounts.authenticate(request.form.get("username", ""), request.form.get("password", ""))
    if user is None:
        return render_template("login.html", error="Unknown user name or wrong password."), 401
    session.clear()  # no session state carries over a change of who is logged in
    login_user(user)
    flash(f"Logged in as {user.name}.")
    return redirect(url_for("pages.index"))


@bp.post("/logout")
def logout():
    logout_user()
    session.clear()
    flash("Logged out.")
    return redirect(url_for("pages.index"))


def init_app(app: Flask) -> None:
    """Flask-Login on the app, the log-in pages, and the refusal to serve an exposed anonymous app."""
    problem = exposure_problem(app.config, os.environ.get(BIND_ENV, ""))
    if problem:
        raise RuntimeError(problem)
    login_manager.init_app(app)
    app.register_blueprint(bp)
    app.context_processor(lambda: {"viewer": current_viewer(), "is_operator": is_operator()})
