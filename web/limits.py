"""Request limits (Flask-Limiter): predictions per API key, per account or per address, and failed
logins per address.

The counters live where RATELIMIT_STORAGE_URI says: `memory://` (the default) keeps them inside
each worker process, so with N workers a client gets up to N times the limit; `redis://HOST:PORT`
shares them between all workers and servers.
"""

from __future__ import annotations

import hashlib

from flask import current_app, request
from flask_limiter.util import get_remote_address
from flask_login import current_user

from web.extensions import limiter


def caller_key() -> str:
    """Whom a prediction counts against: the API key, else the account, else the address."""
    authorization = request.authorization
    if authorization and authorization.type == "bearer" and current_user.is_authenticated:
        return "key:" + hashlib.sha256((authorization.token or "").encode()).hexdigest()[:32]
    if current_user.is_authenticated:
        return f"user:{current_user.id}"
    return "addr:" + get_remote_address()


# The web page and the API share one budget: both classify with the same model.
predict_limit = limiter.shared_limit(
    lambda: current_app.config["PREDICT_RATE_LIMIT"], scope="predict", key_func=caller_key
)
# Only failed attempts count (a successful login redirects), so people who type well are never held.
login_limit = limiter.limit(
    lambda: current_app.config["LOGIN_RATE_LIMIT"],
    key_func=get_remote_address,
    methods=["POST"],
    deduct_when=lambda response: response.status_code != 302,
)
