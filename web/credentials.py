"""Credentials a request carries in its Authorization header: a live API key (`Bearer KEY`) or
the operator's METRICS_TOKEN. A header that is neither is refused (401) on every route, whatever
else the request carries (a session cookie too): it must never pass as anonymous or as the
session's user, nor open a rate-limit bucket of its own.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, current_app, g, request
from flask_login import current_user

import accounts
from web.errors import WebError


def authenticated_key() -> str | None:
    """A digest of the bearer key when it is a live API key of the user the request speaks for."""
    if "authenticated_key" not in g:
        authorization = request.authorization
        digest = None
        if authorization and authorization.type == "bearer" and authorization.token and current_user.is_authenticated:
            owner = accounts.user_for_key(authorization.token)
            if owner is not None and owner.id == current_user.id:
                digest = hashlib.sha256(authorization.token.encode()).hexdigest()[:32]
        g.authenticated_key = digest
    return g.authenticated_key


def metrics_token_sent() -> bool:
    """Whether the request carries `Authorization: Bearer METRICS_TOKEN` (when one is set)."""
    token = current_app.config.get("METRICS_TOKEN")
    authorization = request.authorization
    if not (token and authorization and authorization.type == "bearer"):
        return False
    return hmac.compare_digest((authorization.token or "").encode(), str(token).encode())


def refuse_unauthenticated_authorization() -> None:
    """before_request: an Authorization header that authenticates nothing is refused."""
    if "Authorization" in request.headers and not (authenticated_key() or metrics_token_sent()):
        raise WebError(
            "The Authorization header does not authenticate: the API key is unknown, revoked or not "
            "yours. Send a live key ('Authorization: Bearer KEY') or no Authorization header.",
            "unauthorized",
        )


def init_app(app: Flask) -> None:
    app.before_request(refuse_unauthenticated_authorization)
