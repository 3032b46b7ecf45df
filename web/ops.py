"""For the operator's tools: readiness (`/healthz`) and Prometheus metrics (`/metrics`: for an
operator, the bearer METRICS_TOKEN, or a loopback client unless METRICS_ALLOW_LOOPBACK is off)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from monitoring.metrics import exposition
from web.auth import may_read_metrics
from web.errors import STATUS_BY_CODE, WebError, json_error
from web.extensions import model_serving

bp = Blueprint("ops", __name__)
bp.register_error_handler(Exception, json_error)


@bp.get("/healthz")
def healthz():
    status = model_serving.status()
    return jsonify(status), 200 if status["ready"] and not status["error"] else STATUS_BY_CODE["no_model"]


@bp.get("/metrics")
def metrics():
    if not may_read_metrics():
        raise WebError("Metrics are for operators: send 'Authorization: Bearer METRICS_TOKEN'.", "unauthorized")
    body, content_type = exposition()
    return Response(body, content_type=content_type)
