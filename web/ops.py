"""For the operator's tools: readiness (`/healthz`) and Prometheus metrics (`/metrics`)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

import monitoring
from web.errors import json_error
from web.extensions import model_serving

bp = Blueprint("ops", __name__)
bp.register_error_handler(Exception, json_error)


@bp.get("/healthz")
def healthz():
    status = model_serving.status()
    return jsonify(status), 200 if status["ready"] and not status["error"] else 503


@bp.get("/metrics")
def metrics():
    body, content_type = monitoring.exposition()
    return Response(body, content_type=content_type)
