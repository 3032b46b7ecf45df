"""Request limits (Flask-Limiter): predictions per API key, per account or per address, and failed
logins per address.

A prediction request costs what it asks for: one per image; in the API, EXPLAIN_COST per image
with explain=1 (its maps are up to 1024 pixels a side: 4 noisy 1024-pixel PNGs took 3.0-3.5 s
with maps against 0.5 s without); on the pages, which always draw 256-pixel maps (0.8-0.9 s for
the same 4), PAGE_MAP_COST per image, and as much for the explain page's one map.

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

PAGE_MAP_COST = 2


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


def prediction_cost() -> int:
    if request.blueprint != "api":
        return images_sent() * PAGE_MAP_COST
    explain = request.args.get("explain", "0").lower() in ("1", "true")
    return images_sent() * (int(current_app.config["EXPLAIN_COST"]) if explain else 1)


# The web page, the API and the explain page share one budget: all run the same model.
predict_limit = limiter.shared_limit(
    lambda: current_app.config["PREDICT_RATE_LIMIT"], scope="predict", key_func=caller_key, cost=prediction_cost
)
explain_limit = limiter.shared_limit(
    lambda: current_app.config["PREDICT_RATE_LIMIT"],
    scope="predict",
    key_func=caller_key,
    cost=PAGE_MAP_COST,
)
# Only failed attempts count (a successful login redirects), so people who type well are never held.
login_limit = limiter.limit(
    lambda: current_app.config["LOGIN_RATE_LIMIT"],
    key_func=get_remote_address,
    methods=["POST"],
    deduct_when=lambda response: response.status_code != 302,
)
