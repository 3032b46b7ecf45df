"""The Flask app: factory, configuration, web pages, the JSON API and CLI registration."""

from __future__ import annotations

import base64
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our own messages

from flask import Flask, Response, abort, current_app, flash, g, jsonify, redirect, render_template, request, url_for
from flask_migrate import Migrate
from flask_wtf.csrf import CSRFError, CSRFProtect
from PIL import Image
from sqlalchemy import event
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import history
import model_store
import monitoring
import reports
from cli import register_commands
from model_store import ModelStoreError, db
from predictor import DEFAULT_MAX_PIXELS, ImageError, ModelOutputError
from serving import BatchingConfig, Classification, LoadedModel, ModelHolder, Upload, classify, clean_filename

THUMBNAIL_SIDE = 128

csrf = CSRFProtect()
migrate = Migrate()

DEFAULTS = {
    "MAX_CONTENT_LENGTH": 16 * 1024 * 1024,
    "MAX_IMAGES_PER_REQUEST": 64,
    "MAX_IMAGE_PIXELS": DEFAULT_MAX_PIXELS,
    "MODEL_POLL_SECONDS": 1.0,
    "BATCHING_ENABLED": False,
    "BATCH_MAX_SIZE": 64,
    "BATCH_MAX_WAIT_MS": 2.0,
    "RECORD_HISTORY": True,
    "KEEP_IMAGES": True,
}


def _secret_key(instance_path: Path) -> str:
    """The secret key from the instance folder, generated on first run (never from the code)."""
    key_file = instance_path / "secret_key"
    try:
        # O_EXCL: of several workers starting at once, one creates the key and the others read it.
        handle = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return key_file.read_text().strip()
    with os.fdopen(handle, "w") as key:
        key.write(secrets.token_hex(32))
    return key_file.read_text().strip()


def _database_uri(instance_path: Path) -> str:
    url = os.environ.get("DATABASE_URL")
    if url and url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url or f"sqlite:///{instance_path / 'app.sqlite'}"


def create_app(test_config: dict | None = None) -> Flask:
    """Create and configure the app: instance config.py, then FLASK_* environment variables.

    The instance folder (database, secret key, rehydrated models) is `instance/` beside this file
    unless INSTANCE_PATH (in `test_config` or the environment) names another.
    """
    instance_override = (test_config or {}).get("INSTANCE_PATH") or os.environ.get("INSTANCE_PATH")
    app = Flask(
        __name__,
        instance_path=instance_override and str(Path(instance_override).resolve()),
        instance_relative_config=True,
    )
    instance_path = Path(app.instance_path)
    instance_path.mkdir(parents=True, exist_ok=True)
    app.config.from_mapping(DEFAULTS, SQLALCHEMY_DATABASE_URI=_database_uri(instance_path))
    if test_config is None:
        app.config.from_pyfile("config.py", silent=True)
        app.config.from_prefixed_env()
    else:
        app.config.from_mapping(test_config)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = _secret_key(instance_path)
    app.config.setdefault("MODEL_CACHE_DIR", str(instance_path / "models"))
    # Pillow's own decompression-bomb guard, at the same limit as our header check.
    Image.MAX_IMAGE_PIXELS = int(app.config["MAX_IMAGE_PIXELS"])

    app.json.sort_keys = False  # probabilities are listed ranked, best first
    app.jinja_env.filters["jpeg_data_uri"] = lambda data: "data:image/jpeg;base64," + base64.b64encode(data).decode()
    db.init_app(app)
    migrate.init_app(app, db, directory=str(Path(__file__).resolve().parent / "migrations"))
    csrf.init_app(app)
    batching = BatchingConfig(
        bool(app.config["BATCHING_ENABLED"]), int(app.config["BATCH_MAX_SIZE"]), float(app.config["BATCH_MAX_WAIT_MS"])
    )
    app.extensions["model_holder"] = ModelHolder(
        Path(app.config["MODEL_CACHE_DIR"]), float(app.config["MODEL_POLL_SECONDS"]), batching
    )
    with app.app_context():
        _tune_sqlite(db.engine)

    register_routes(app)
    register_errors(app)
    app.before_request(_start_timer)
    app.after_request(_record_request)
    app.after_request(_security_headers)
    register_commands(app)
    return app


def _tune_sqlite(engine) -> None:
    """WAL and a busy timeout, so several workers read and write without "database is locked"."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def set_pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        # In WAL mode NORMAL still never corrupts the database; it skips an fsync per commit,
        # which every recorded prediction would otherwise pay.
        cursor.execute("PRAGMA synchronous=NORMAL")
        # SQLite ignores foreign keys (and so ON DELETE SET NULL) unless asked.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def _start_timer() -> None:
    g.started = time.perf_counter()


def _record_request(response):
    route = request.url_rule.rule if request.url_rule else "unmatched"
    monitoring.REQUESTS.labels(route, request.method, str(response.status_code)).inc()
    if "started" in g:
        monitoring.LATENCY.labels(route).observe(time.perf_counter() - g.started)
    return response


def holder() -> ModelHolder:
    return current_app.extensions["model_holder"]


def _security_headers(response):
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data: blob:; script-src 'self'; style-src 'self'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


# ---------------------------------------------------------------- request helpers


class RequestError(Exception):
    """A client error with its HTTP status and a machine-readable code."""

    def __init__(self, message: str, status: int, code: str):
        super().__init__(message)
        self.message, self.status, self.code = message, status, code


def uploads_from_request(field: str = "image") -> list[Upload]:
    """The images of a request: multipart field `field` (repeatable) or a raw image body."""
    content_type = (request.mimetype or "").lower()
    if content_type.startswith("image/"):
        data = request.get_data(cache=False)
        name = clean_filename(request.args.get("filename"), "upload")
        uploads = [Upload(name, data)]
    elif content_type == "multipart/form-data":
        files = [f for f in request.files.getlist(field) if f.filename or f.content_length]
        uploads = [Upload(clean_filename(f.filename), f.read()) for f in files]
    else:
        raise RequestError(
            f"Send images as multipart/form-data field '{field}' or as a raw body with an image/* content type.",
            415 if request.content_length else 400,
            "unsupported_media_type" if request.content_length else "no_file",
        )
    if not uploads:
        raise RequestError(f"No image was sent: choose a file (multipart field '{field}').", 400, "no_file")
    limit = current_app.config["MAX_IMAGES_PER_REQUEST"]
    if len(uploads) > limit:
        raise RequestError(
            f"Too many images: {len(uploads)} sent, at most {limit} per request.", 413, "too_many_images"
        )
    return uploads


def active_model() -> LoadedModel:
    loaded = holder().current()
    if loaded is None:
        raise RequestError(holder().error or "No model is loaded.", 503, "no_model")
    return loaded


@dataclass(frozen=True)
class Answer:
    """A classified request: the model that answered, its result and the history ids."""

    model: LoadedModel
    result: Classification
    prediction_ids: list[int | None]


def run_classification(uploads: list[Upload], source: str, thumbnails: bool) -> Answer:
    """Classify uploads with the active model and record them in the history when enabled."""
    config = current_app.config
    keep_images = bool(config["KEEP_IMAGES"])
    side = THUMBNAIL_SIDE if thumbnails or keep_images else 0
    loaded = active_model()
    try:
        result = classify(uploads, loaded, config["MAX_IMAGE_PIXELS"], side)
    except ImageError as exc:
        raise RequestError(exc.message, exc.status, exc.code) from exc
    except ModelOutputError as exc:
        current_app.logger.error("model %s v%s: %s", loaded.name, loaded.version, exc)
        raise RequestError(str(exc), 500, "model_output") from exc
    ids: list[int | None] = [None] * len(uploads)
    if config["RECORD_HISTORY"]:
        items = [
            history.Recorded(u.filename, u.data, p.top_class, p.top_probability, t if keep_images else None)
            for u, p, t in zip(uploads, result.predictions, result.thumbnails, strict=True)
        ]
        ids = list(history.record(items, loaded, source))
    return Answer(loaded, result, ids)


def _refuse_cross_site() -> None:
    """The API is for scripts, which send no Origin; a browser on another site does, and could
    otherwise plant images in the history (the API needs no CSRF token)."""
    origin = request.headers.get("Origin")
    if origin and urlsplit(origin).netloc != request.host:
        raise RequestError("Cross-site browser requests to the API are refused.", 403, "cross_site")


def _top_k() -> int | None:
    raw = request.args.get("top_k")
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise RequestError("top_k must be a positive integer.", 400, "bad_top_k")
    return int(raw)


# ---------------------------------------------------------------- routes


def register_routes(app: Flask) -> None:
    @app.get("/")
    def index():
        return render_page()

    @app.post("/")
    def classify_page():
        try:
            uploads = uploads_from_request()
            answer = run_classification(uploads, "web", thumbnails=True)
        except RequestError as exc:
            return render_page(error=exc.message), exc.status
        results = [
            {"filename": upload.filename, "prediction": prediction, "thumbnail": thumbnail, "id": prediction_id}
            for upload, prediction, thumbnail, prediction_id in zip(
                uploads, answer.result.predictions, answer.result.thumbnails, answer.prediction_ids, strict=True
            )
        ]
        return render_page(results=results, answered_by=answer.model, elapsed_ms=answer.result.elapsed_ms)

    @app.get("/history")
    def history_page():
        top_class = request.args.get("class") or None
        model_id = request.args.get("model", type=int)
        page = db.paginate(history.query(top_class, model_id), per_page=20, error_out=False)
        return render_template(
            "history.html",
            page=page,
            top_class=top_class,
            model_id=model_id,
            models=model_store.list_models(),
            feedback=history.feedback_by_model(),
            class_names=_known_classes(),
            status=holder_status(),
        )

    @app.get("/predictions/<int:prediction_id>/thumbnail.jpg")
    def prediction_thumbnail(prediction_id: int):
        try:
            thumbnail = history.get(prediction_id).thumbnail
        except history.HistoryError:
            abort(404)
        if not thumbnail:
            abort(404)
        return Response(thumbnail, mimetype="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    @app.post("/predictions/<int:prediction_id>/feedback")
    def prediction_feedback(prediction_id: int):
        verdict = request.form.get("verdict", "")
        correct_class = request.form.get("correct_class") or None
        try:
            row = history.set_feedback(prediction_id, verdict, correct_class)
        except history.PredictionNotFound as exc:
            raise RequestError(str(exc), 404, "not_found") from exc
        except history.HistoryError as exc:
            raise RequestError(str(exc), 400, "bad_feedback") from exc
        note = "right" if row.feedback == "right" else f"wrong (it is {row.correct_class})"
        flash(f"Thank you: prediction #{row.id} of {row.filename} is marked {note}.")
        return redirect(url_for("history_page", _anchor=f"p{row.id}"))

    @app.get("/models")
    def models_page():
        return render_template("models.html", models=model_store.list_models(), status=holder_status())

    @app.get("/models/<int:model_id>")
    def model_card(model_id: int):
        try:
            row = model_store.get_model(model_id)
        except ModelStoreError:
            abort(404)
        return render_template("model_card.html", model=row, status=holder_status())

    @app.get("/models/<int:model_id>/<any(curves, confusion):plot>.png")
    def model_plot(model_id: int, plot: str):
        try:
            metrics = model_store.get_model(model_id).metrics
        except ModelStoreError:
            abort(404)
        if plot == "curves" and metrics.get("history"):
            png = reports.curves_png(metrics["history"])
        elif plot == "confusion" and metrics.get("confusion_matrix"):
            names = metrics.get("class_names") or model_store.get_model(model_id).class_names
            png = reports.confusion_png(metrics["confusion_matrix"], names, metrics.get("test_accuracy", 0.0))
        else:
            abort(404)
        return Response(png, mimetype="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/metrics")
    def metrics():
        body, content_type = monitoring.exposition()
        return Response(body, content_type=content_type)

    @app.get("/healthz")
    def healthz():
        status = holder_status()
        return jsonify(status), 200 if status["ready"] and not status["error"] else 503

    @app.get("/api/v1/models")
    def api_models():
        return jsonify({"models": [_public(row.to_dict()) for row in model_store.list_models()]})

    @app.post("/api/v1/predict")
    @csrf.exempt
    def api_predict():
        _refuse_cross_site()
        top_k = _top_k()
        uploads = uploads_from_request()
        answer = run_classification(uploads, "api", thumbnails=False)
        return jsonify(
            {
                "model": answer.model.describe(),
                "elapsed_ms": round(answer.result.elapsed_ms, 2),
                "predictions": [
                    {
                        "id": prediction_id,
                        "filename": upload.filename,
                        "top_class": prediction.top_class,
                        "probability": prediction.top_probability,
                        "probabilities": dict(prediction.ranked[:top_k]),
                    }
                    for upload, prediction, prediction_id in zip(
                        uploads, answer.result.predictions, answer.prediction_ids, strict=True
                    )
                ],
            }
        )


def _known_classes() -> list[str]:
    """Every class name of every stored model, for the history filter."""
    names: dict[str, None] = {}
    for row in model_store.list_models():
        names.update(dict.fromkeys(row.class_names))
    return list(names)


def _public(model: dict) -> dict:
    """Registry metadata for the API: the training history is long and stays on the model card."""
    metrics = {key: value for key, value in model["metrics"].items() if key != "history"}
    return {**model, "metrics": metrics}


def holder_status() -> dict:
    """Readiness of this process and the model it serves."""
    loaded = holder().current()
    return {
        "ready": loaded is not None,
        "model": loaded.describe() if loaded else None,
        "classes": list(loaded.class_names) if loaded else [],
        "error": holder().error,
    }


def render_page(**context):
    return render_template("index.html", status=holder_status(), **context)


# ---------------------------------------------------------------- errors


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.path == "/healthz"


def _error_response(message: str, status: int, code: str):
    if _wants_json():
        return jsonify({"error": {"code": code, "message": message}}), status
    if request.endpoint in ("index", "classify_page") or request.path == "/":
        return render_page(error=message), status
    return render_template("error.html", message=message, status_code=status, status=holder_status()), status


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


def register_errors(app: Flask) -> None:
    @app.errorhandler(RequestError)
    def request_error(exc: RequestError):
        return _error_response(exc.message, exc.status, exc.code)

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(exc):
        limit_mb = app.config["MAX_CONTENT_LENGTH"] / (1024 * 1024)
        _discard_body(4 * app.config["MAX_CONTENT_LENGTH"])
        return _error_response(f"The upload is too large: the limit is {limit_mb:g} MB per request.", 413, "too_large")

    @app.errorhandler(CSRFError)
    def csrf_error(exc: CSRFError):
        return _error_response(
            f"The form expired or was not sent from this site ({exc.description}). Reload the page and try again.",
            400,
            "csrf",
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        return _error_response(exc.description or exc.name, exc.code or 500, code)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        app.logger.exception("unexpected error")
        return _error_response("Something went wrong on our side; the error was logged.", 500, "internal")
