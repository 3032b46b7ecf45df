"""The session cookie: Secure whenever the request came over HTTPS, and then host-only by name."""

from __future__ import annotations

from flask import Flask, request
from flask.sessions import SecureCookieSessionInterface


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


def init_app(app: Flask) -> None:
    app.session_interface = HttpsAwareSessionInterface()
