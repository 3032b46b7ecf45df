"""Request limits (Flask-Limiter): predictions per API key, per account or per address, and failed
logins per address.

A prediction request costs what it asks for: one per image, EXPLAIN_COST per image with a
saliency map (the page always draws them; the API with explain=1; the explain page draws one).

The counters live where RATELIMIT_STORAGE_URI says: `memory://` (the default) keeps them inside
each worker process, so with N workers a client gets up to N times the limit; `redis://HOST:PORT`
shares them between all workers and servers.
"""

from __future__ import annotations

from flask import current_app, request
from flask_limiter.util import get_remote_address
from flask_login import current_user

from web.credentials import authenticated_key
from web.extensions import limiter


def caller_key() -> str:
    """Whom a prediction counts against: the API key (only one that authenticated: any other
    string would open a fresh bucket), else the account, else the address."""
    key = authenticated_key()
    if key:
        return "key:" + key
    if current_user.is_authenticated:
        return f"user:{current_user.id}"
    return "addr:" + get_remote_address()


def images_sent() -> int:
    """How many images the request sends (multipart field `image`, or one raw image body), counted
    before the view reads them; at most one over MAX_IMAGES_PER_REQUEST, which the view refuses."""
    if (request.mimetype or "").startswith("image/"):
        return 1
    sent = len(request.files.getlist("image")) if request.mimetype == "multipart/form-data" else 0
    return max(1, min(sent, int(current_app.config["MAX_IMAGES_PER_REQUEST"]) + 1))


def explain_requested() -> bool:
    """The page always draws saliency maps; the API when asked (explain=1 or true)."""
    return request.blueprint != "api" or request.args.get("explain", "0").lower() in ("1", "true")


def prediction_cost() -> int:
    weight = int(current_app.config["EXPLAIN_COST"]) if explain_requested() else 1
    return images_sent() * weight


# The web page, the API and the explain page share one budget: all run the same model.
predict_limit = limiter.shared_limit(
    lambda: current_app.config["PREDICT_RATE_LIMIT"], scope="predict", key_func=caller_key, cost=prediction_cost
)
explain_limit = limiter.shared_limit(
    lambda: current_app.config["PREDICT_RATE_LIMIT"],
    scope="predict",
    key_func=caller_key,
    cost=lambda: int(current_app.config["EXPLAIN_COST"]),
)
# Only failed attempts count (a successful login redirects), so people who type well are never held.
login_limit = limiter.limit(
    lambda: current_app.config["LOGIN_RATE_LIMIT"],
    key_func=get_remote_address,
    methods=["POST"],
    deduct_when=lambda response: response.status_code != 302,
)
