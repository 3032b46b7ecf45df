"""The error edge: every error the app answers has a machine-readable code, and this table maps
codes to HTTP statuses. Domain modules raise AppErrors (app_errors.py) with a code; only this
module knows statuses, and the front door's own answers (deploy/nginx.conf.template) use the same
codes and statuses (tests/test_errors_table.py holds them to it).
"""

from __future__ import annotations

from flask import Flask, current_app, jsonify, render_template, request
from flask_limiter.errors import RateLimitExceeded
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, SecurityError

from app_errors import AppError

STATUS_BY_CODE = {
    "no_file": 400,
    "empty_file": 400,
    "corrupt_image": 400,
    "bad_image": 400,
    "bad_top_k": 400,
    "bad_explain": 400,
    "unknown_class": 400,
    "bad_feedback": 400,
    "bad_account": 400,
    "unauthorized": 401,
    "csrf": 400,
    "cross_site": 403,
    "forbidden": 403,
    "not_found": 404,
    "too_large": 413,
    "too_many_images": 413,
    "too_many_pixels": 413,
    "request_too_large": 413,
    "unsupported_media_type": 415,
    "registry": 409,
    "rate_limited": 429,
    "account_locked": 429,
    "no_explanation": 422,
    "feedback_locked": 409,
    "model_output": 500,
    "internal": 500,
    "no_model": 503,
    # Answered by nginx in front (deploy/nginx.conf.template), never by the app itself.
    "unavailable": 503,
    "timeout": 504,
}


class WebError(AppError):
    """An error found at the web edge (a request without a file, a bad parameter, no model)."""


def describe(exc: Exception) -> tuple[str, str, int]:
    """(message, code, status) for any exception a view can raise; the status is the table's."""
    known = _message_and_code(exc)
    if known is not None:
        message, code = known
        return message, code, STATUS_BY_CODE[code]
    if isinstance(exc, HTTPException):
        # Werkzeug's own refusals (404, 405 ...): its status, its name as the code.
        code = (exc.name or "error").lower().replace(" ", "_")
        return exc.description or exc.name, code, exc.code or STATUS_BY_CODE["internal"]
    current_app.logger.exception("unexpected error")
    return "Something went wrong on our side; the error was logged.", "internal", STATUS_BY_CODE["internal"]


def _message_and_code(exc: Exception) -> tuple[str, str] | None:
    """(message, code) of an error the table knows, None for any other."""
    if isinstance(exc, RequestEntityTooLarge):
        limit_mb = current_app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        _discard_body(4 * current_app.config["MAX_CONTENT_LENGTH"])
        return f"The upload is too large: the limit is {limit_mb:g} MB per request.", "too_large"
    if isinstance(exc, CSRFError):
        message = f"The form expired or was not sent from this site ({exc.description}). Reload the page and try again."
        return message, "csrf"
    if isinstance(exc, RateLimitExceeded):
        return f"Too many requests: the limit is {exc.description}. Try again later.", "rate_limited"
    if isinstance(exc, AppError) and exc.code in STATUS_BY_CODE:
        if exc.code == "model_output":
            current_app.logger.error("model output: %s", exc)
        return exc.message, exc.code
    return None


def _protocol_headers(exc: Exception) -> dict[str, str]:
    """Headers HTTP requires with an error, such as Allow with a 405 (not its content type)."""
    if not isinstance(exc, HTTPException):
        return {}
    return {name: value for name, value in exc.get_headers() if name.lower() != "content-type"}


def json_error(exc: Exception):
    """The JSON answer for an error: {"error": {"code", "message"}} with its status."""
    message, code, status = describe(exc)
    return jsonify({"error": {"code": code, "message": message}}), status, _protocol_headers(exc)


def html_error(exc: Exception):
    """The error page for an error, with its status."""
    message, _code, status = describe(exc)
    return render_template("error.html", message=message, status_code=status), status, _protocol_headers(exc)


def _discard_body(cap: int) -> None:
    """Read and drop an unread request body of up to `cap` bytes.

    A client still sending when the server answers 413 and closes sees a broken pipe, not the
    answer; draining a moderately oversized body lets it read the 413. Larger bodies are not
    drained: the server closes the connection instead.
    """
    length = request.content_length or 0
    if length > cap:
        return
    stream = request.environ.get("wsgi.input")
    remaining = length
    while stream is not None and remaining > 0:
        chunk = stream.read(min(remaining, 1 << 20))
        if not chunk:
            break
        remaining -= len(chunk)


def init_app(app: Flask, api_prefix: str) -> None:
    """The fallback for errors no blueprint sees: unrouted paths (404) and wrong methods (405)."""

    @app.errorhandler(Exception)
    def fallback(exc: Exception):
        # A Host outside TRUSTED_HOSTS leaves no URL adapter to render a page with: JSON then.
        if request.path.startswith(api_prefix) or isinstance(exc, SecurityError):
            return json_error(exc)
        return html_error(exc)
