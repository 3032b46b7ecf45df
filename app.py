"""The Flask app factory: configuration, extensions, blueprints and app-wide response headers."""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our own messages

from flask import Flask
from PIL import Image
from werkzeug.middleware.proxy_fix import ProxyFix

import database
from accounts import PASSWORD_METHOD, Lockout
from cli import register_commands
from inference import heatmap
from model_sandbox import ImportLimits
from predictor import DEFAULT_MAX_PIXELS
from serving import DEFAULT_MAX_REQUEST_PIXELS
from web import (
    api,
    auth,
    credentials,
    errors,
    extensions,
    inputs,
    label,
    monitoring,
    ops,
    pages,
    privacy,
    prometheus,
    rollout_pages,
    sessions,
)

DEFAULTS = {
    "MAX_CONTENT_LENGTH": 16 * 1024 * 1024,
    "MAX_IMAGES_PER_REQUEST": 64,
    "MAX_IMAGE_PIXELS": DEFAULT_MAX_PIXELS,
    "MAX_REQUEST_PIXELS": DEFAULT_MAX_REQUEST_PIXELS,
    "MAX_CONCURRENT_DECODES": 2,
    # `flask models import`: caps on a model file, and its validation load in a limited child process.
    "MODEL_MAX_BYTES": ImportLimits.max_bytes,
    "MODEL_MAX_PARAMS": ImportLimits.max_params,
    "MODEL_IMPORT_MEMORY_BYTES": ImportLimits.memory_bytes,
    "MODEL_IMPORT_CPU_SECONDS": ImportLimits.cpu_seconds,
    "MODEL_IMPORT_SANDBOX": True,
    # The child in bubblewrap's namespaces; false keeps its limits but runs it without them.
    "MODEL_IMPORT_CONFINE": True,
    "MODEL_POLL_SECONDS": 1.0,
    "BATCHING_ENABLED": False,
    "BATCH_MAX_SIZE": 64,
    "BATCH_MAX_WAIT_MS": 2.0,
    "RECORD_HISTORY": True,
    "KEEP_IMAGES": True,
    # Accounts and privacy (README, Security and privacy). None: on, but refused on a non-loopback bind.
    "ALLOW_ANONYMOUS": None,
    "ALLOW_ANONYMOUS_API": None,
    "RETENTION_DAYS": 30,
    "METRICS_TOKEN": None,
    "METRICS_ALLOW_LOOPBACK": True,
    "TRUSTED_HOSTS": [],  # added to the loopback names
    "SESSION_COOKIE_SAMESITE": "Lax",
    # A log-in lasts at most this long (seconds; Flask's default is 31 days): the signed cookie is
    # refused once older, whatever the browser keeps.
    "PERMANENT_SESSION_LIFETIME": 14 * 24 * 3600,
    # After this many failed log-ins in a row an account refuses log-ins for LOGIN_LOCKOUT_MINUTES.
    "LOGIN_LOCKOUT_FAILURES": Lockout.failures,
    "LOGIN_LOCKOUT_MINUTES": Lockout.duration.total_seconds() / 60,
    # Proxies in front that set X-Forwarded-For/-Proto (1 behind make serve-proxy's nginx, 2 with a
    # TLS terminator before it): without it every client behind the proxy has the proxy's address
    # and shares one rate-limit bucket, and the app cannot tell it is served over HTTPS.
    "PROXY_HOPS": 0,
    "RATELIMIT_ENABLED": True,
    "RATELIMIT_STORAGE_URI": "memory://",
    "RATELIMIT_HEADERS_ENABLED": True,
    # Counted in images: an image with an API saliency map counts EXPLAIN_COST (web/limits.py).
    "PREDICT_RATE_LIMIT": "120 per minute",
    "EXPLAIN_COST": 6,
    "MAX_EXPLAINED_IMAGES": 4,  # per API request with explain=1
    "LOGIN_RATE_LIMIT": "5 per minute",
    # How passwords are hashed (werkzeug.security); a cheaper method than this is refused outside TESTING.
    "PASSWORD_HASH_METHOD": PASSWORD_METHOD,
}

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def create_app(test_config: dict | None = None) -> Flask:
    """Create and configure the app: instance config.py, then FLASK_* environment variables.

    The instance folder (database, secret key, rehydrated models) is `instance/` beside this file
    unless INSTANCE_PATH (in `test_config` or the environment) names another.
    """
    instance = database.instance_path((test_config or {}).get("INSTANCE_PATH"))
    app = Flask(__name__, instance_path=str(instance), instance_relative_config=True)
    # The instance folder holds every kept photo and the secret key: for this account only.
    instance.mkdir(mode=0o700, parents=True, exist_ok=True)
    instance.chmod(0o700)
    app.config.from_mapping(DEFAULTS, SQLALCHEMY_DATABASE_URI=database.database_uri(instance))
    if test_config is None:
        app.config.from_pyfile("config.py", silent=True)
        app.config.from_prefixed_env()
    else:
        app.config.from_mapping(test_config)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = _secret_key(instance)
    app.config.setdefault("MODEL_CACHE_DIR", str(instance / "models"))
    app.config["TRUSTED_HOSTS"] = [*auth.LOOPBACK_NAMES, *app.config["TRUSTED_HOSTS"]]
    # Pillow's own decompression-bomb guard, at the same limit as our header check.
    Image.MAX_IMAGE_PIXELS = int(app.config["MAX_IMAGE_PIXELS"])

    hops = int(app.config["PROXY_HOPS"])
    if hops:
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)
    app.json.sort_keys = False  # probabilities are listed ranked, best first
    app.jinja_env.filters["jpeg_data_uri"] = lambda data: "data:image/jpeg;base64," + base64.b64encode(data).decode()
    app.jinja_env.filters["png_data_uri"] = heatmap.data_uri
    inputs.init_app(app)
    auth.init_app(app)
    extensions.init_app(app)
    credentials.init_app(app)
    sessions.init_app(app)
    privacy.init_app(app)
    prometheus.init_app(app)
    for blueprint in (auth.bp, pages.bp, label.bp, api.bp, ops.bp, monitoring.bp, rollout_pages.bp):
        app.register_blueprint(blueprint)
    errors.init_app(app, api.API_PREFIX)
    app.after_request(_security_headers)
    register_commands(app)
    return app


def _secret_key(instance: Path) -> str:
    """The secret key from the instance folder, generated on first run (never from the code)."""
    key_file = instance / "secret_key"
    if not key_file.exists():
        # Written whole to a temporary file (0600), then linked into place: a worker starting at
        # the same moment sees no file or the full key, never an empty one. Of several workers,
        # the first link wins and the others read its key.
        handle, temporary = tempfile.mkstemp(dir=instance, prefix=".secret_key.")
        try:
            with os.fdopen(handle, "w") as key:
                key.write(secrets.token_hex(32))
                key.flush()
                os.fsync(key.fileno())
            os.link(temporary, key_file)
        except FileExistsError:
            pass
        finally:
            os.unlink(temporary)
    return key_file.read_text().strip()


def _security_headers(response):
    response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    # same-origin: Flask-WTF checks the Referer of form posts over HTTPS, and other sites get none.
    response.headers["Referrer-Policy"] = "same-origin"
    return response
