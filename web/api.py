"""The JSON API for scripts (`/api/v1`): classify images, list the registry. Errors are JSON.

The API needs no CSRF token, so a browser on another site could use it to plant images in the
history: requests that carry an Origin outside TRUSTED_HOSTS are refused before any work. Callers
are anonymous (ALLOW_ANONYMOUS_API) or send `Authorization: Bearer KEY`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, current_app, jsonify, request
from werkzeug.sansio.utils import host_is_trusted

import model_store
from web.auth import is_operator, require_api_caller
from web.errors import WebError, json_error
from web.extensions import csrf
from web.limits import predict_limit
from web.uploads import classify_request

API_PREFIX = "/api/v1"
# Ten classes are the usual case; the cap keeps a request from asking for a huge ranking.
MAX_TOP_K = 1000

bp = Blueprint("api", __name__, url_prefix=API_PREFIX)
csrf.exempt(bp)
bp.register_error_handler(Exception, json_error)


@bp.before_request
def refuse_cross_site() -> None:
    """Scripts send no Origin; a browser on another site does. The Host header is not compared:
    a DNS-rebinding page chooses it, and the Origin with it."""
    origin = request.headers.get("Origin")
    if origin and not host_is_trusted(urlsplit(origin).netloc, current_app.config["TRUSTED_HOSTS"]):
        raise WebError("Cross-site browser requests to the API are refused.", "cross_site")


bp.before_request(require_api_caller)


def _top_k() -> int | None:
    raw = request.args.get("top_k")
    if raw is None:
        return None
    # str.isdigit() accepts digits such as "²" that int() refuses: only ASCII decimals pass.
    if not (raw.isascii() and raw.isdecimal()) or not 1 <= int(raw) <= MAX_TOP_K:
        raise WebError(f"top_k must be an integer from 1 to {MAX_TOP_K}.", "bad_top_k")
    return int(raw)


@bp.post("/predict")
@predict_limit
def predict():
    top_k = _top_k()
    answered_by, result = classify_request("api", thumbnails=False)
    return jsonify(
        {
            "model": answered_by.describe(),
            "elapsed_ms": round(result.elapsed_ms, 2),
            "predictions": [
                {
                    "id": image.history_id,
                    "filename": image.filename,
                    "top_class": image.prediction.top_class,
                    "probability": image.prediction.top_probability,
                    "probabilities": dict(image.prediction.ranked[:top_k]),
                }
                for image in result.images
            ],
        }
    )


@bp.get("/models")
def models():
    private = () if is_operator() else model_store.PRIVATE_METRICS
    return jsonify({"models": [_public(row.to_dict(), private) for row in model_store.list_models()]})


def _public(model: dict, private: tuple[str, ...]) -> dict:
    """Registry metadata for the API: the training history is long and stays on the model card;
    where and how the model was trained is for operators only."""
    metrics = {key: value for key, value in model["metrics"].items() if key != "history" and key not in private}
    return {**model, "metrics": metrics}
