"""The JSON API for scripts (`/api/v1`): classify images, list the registry. Errors are JSON.

The API needs no CSRF token, so a browser on another site could use it to plant images in the
history: requests that carry an Origin of another site are refused before any work.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, jsonify, request

import model_store
from web.errors import WebError, json_error
from web.extensions import csrf
from web.uploads import classify_request

API_PREFIX = "/api/v1"
# Ten classes are the usual case; the cap keeps a request from asking for a huge ranking.
MAX_TOP_K = 1000

bp = Blueprint("api", __name__, url_prefix=API_PREFIX)
csrf.exempt(bp)
bp.register_error_handler(Exception, json_error)


@bp.before_request
def refuse_cross_site() -> None:
    """Scripts send no Origin; a browser on another site does."""
    origin = request.headers.get("Origin")
    if origin and urlsplit(origin).netloc != request.host:
        raise WebError("Cross-site browser requests to the API are refused.", "cross_site")


def _top_k() -> int | None:
    raw = request.args.get("top_k")
    if raw is None:
        return None
    # str.isdigit() accepts digits such as "²" that int() refuses: only ASCII decimals pass.
    if not (raw.isascii() and raw.isdecimal()) or not 1 <= int(raw) <= MAX_TOP_K:
        raise WebError(f"top_k must be an integer from 1 to {MAX_TOP_K}.", "bad_top_k")
    return int(raw)


@bp.post("/predict")
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
                    "decision": image.prediction.decision,
                    "ood_score": image.prediction.ood_score,
                }
                for image in result.images
            ],
        }
    )


@bp.get("/models")
def models():
    calibrations = model_store.calibration_summaries()
    return jsonify({"models": [_public(row.to_dict(), calibrations.get(row.id)) for row in model_store.list_models()]})


def _public(model: dict, calibration_summary: dict | None) -> dict:
    """Registry metadata for the API: the training history is long and stays on the model card;
    the calibration is its summary (temperature, thresholds, ECE)."""
    metrics = {key: value for key, value in model["metrics"].items() if key != "history"}
    return {**model, "metrics": metrics, "calibration": calibration_summary or {"calibrated": False}}
