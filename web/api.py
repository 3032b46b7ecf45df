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
from inference import heatmap
from serving import ClassifiedImage
from web.auth import is_operator, require_api_caller
from web.classify import classify_request
from web.errors import WebError, json_error
from web.extensions import csrf
from web.limits import images_sent, predict_limit
from web.privacy import no_store

API_PREFIX = "/api/v1"
DEFAULT_PORTS = {"http": 80, "https": 443}
# Ten classes are the usual case; the cap keeps a request from asking for a huge ranking.
MAX_TOP_K = 1000

bp = Blueprint("api", __name__, url_prefix=API_PREFIX)
csrf.exempt(bp)
bp.register_error_handler(Exception, json_error)


@bp.before_request
def refuse_cross_site() -> None:
    """Scripts send no Origin; a browser on another site does. An Origin passes when it is this
    server's own (scheme, host and port, as the request or the trusted proxies say) and its host
    is trusted: a host alone is not enough, as another port or scheme is another program, and the
    Host header alone is not either, as a DNS-rebinding page chooses it, and the Origin with it."""
    origin = request.headers.get("Origin")
    if origin is None:
        return
    claimed, served = _origin_parts(origin), _origin_parts(f"{request.scheme}://{request.host}")
    trusted = host_is_trusted(request.host, current_app.config["TRUSTED_HOSTS"])
    if claimed is None or claimed != served or not trusted:
        raise WebError("Cross-site browser requests to the API are refused.", "cross_site")


def _origin_parts(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) with the scheme's default port filled in; None when malformed."""
    parts = urlsplit(origin)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    return (parts.scheme, (parts.hostname or "").lower(), port) if parts.hostname and port else None


bp.before_request(require_api_caller)


def _top_k() -> int | None:
    raw = request.args.get("top_k")
    if raw is None:
        return None
    # str.isdigit() accepts digits such as "²" that int() refuses: only ASCII decimals pass.
    if not (raw.isascii() and raw.isdecimal()) or not 1 <= int(raw) <= MAX_TOP_K:
        raise WebError(f"top_k must be an integer from 1 to {MAX_TOP_K}.", "bad_top_k")
    return int(raw)


def _explain() -> bool:
    raw = request.args.get("explain", "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise WebError("explain must be 1 (or true) to add saliency maps, 0 (or false) for none.", "bad_explain")
    return raw in ("1", "true")


def _prediction(image: ClassifiedImage, top_k: int | None, explain: bool) -> dict:
    answer = {
        "id": image.history_id,
        "filename": image.filename,
        "top_class": image.prediction.top_class,
        "probability": image.prediction.top_probability,
        "probabilities": dict(image.prediction.ranked[:top_k]),
        "decision": image.prediction.decision,
        "ood_score": image.prediction.ood_score,
    }
    if explain:
        saliency = image.saliency
        answer["saliency"] = heatmap.data_uri(saliency.overlay_png) if saliency else None
        answer["saliency_grid"] = saliency.grid.round(4).tolist() if saliency else None
    return answer


@bp.post("/predict")
@predict_limit
@no_store
def predict():
    top_k, explain = _top_k(), _explain()
    most = current_app.config["MAX_EXPLAINED_IMAGES"]
    # Each map is a PNG of up to 1024 pixels a side (about 3 MB in base64 for a noisy photo): the
    # cap bounds the work and the answer's size before any image is decoded.
    if explain and images_sent() > most:
        raise WebError(f"explain=1 is for at most {most} images per request: send the others apart.", "too_many_images")
    answered_by, result = classify_request("api", thumbnails=False, explain_side=heatmap.OVERLAY_MAX_SIDE * explain)
    answer = {"model": answered_by.describe(), "elapsed_ms": round(result.elapsed_ms, 2)}
    if explain:
        # Per model, not per image: why there are no maps, or which layer they come from.
        layer = answered_by.explainer.layer_name
        answer["explanation"] = {"unavailable": result.no_explanation} if result.no_explanation else {"layer": layer}
    answer["predictions"] = [_prediction(image, top_k, explain) for image in result.images]
    return jsonify(answer)


@bp.get("/models")
def models():
    operator = is_operator()
    calibrations = model_store.calibration_summaries()
    return jsonify(
        {"models": [_public(row.to_dict(), operator, calibrations.get(row.id)) for row in model_store.list_models()]}
    )


def _public(model: dict, operator: bool, calibration_summary: dict | None) -> dict:
    """Registry metadata for the API: the training history is long and stays on the model card;
    others than operators see the public metrics only (model_store.PUBLIC_METRICS); the
    calibration is its summary (temperature, thresholds, ECE)."""
    metrics = model["metrics"] if operator else model_store.public_metrics(model["metrics"])
    metrics = {key: value for key, value in metrics.items() if key != "history"}
    return {**model, "metrics": metrics, "calibration": calibration_summary or {"calibrated": False}}
