"""Prometheus metrics: requests by route and status, latency, images per model call, the models served.

`init_app` times every request of an app and counts it by route, method and status.

Under gunicorn, PROMETHEUS_MULTIPROC_DIR (set by gunicorn.conf.py before any worker starts) makes
every worker write its samples to files that `/metrics` aggregates, whichever worker answers.
"""

from __future__ import annotations

import os
import time

from flask import Flask, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("imgcls_http_requests_total", "HTTP requests answered.", ["route", "method", "status"])
LATENCY = Histogram(
    "imgcls_http_request_duration_seconds",
    "Time from request to response.",
    ["route"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
BATCH_SIZE = Histogram("imgcls_model_batch_size", "Images per model call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
IMAGES = Counter("imgcls_images_classified_total", "Images classified.")
MODEL_LOADED = Gauge(
    "imgcls_model_loaded",
    "1 for each model version this process serves, by slot.",
    ["slot", "model_id", "name", "version"],
    multiprocess_mode="livemax",
)

# Per model version, from its latest closed window of predictions (monitoring/windows.py).
_VERSION = ["model_id", "name", "version"]
DRIFT_ESTIMATED_ACCURACY = Gauge(
    "imgcls_drift_estimated_accuracy",
    "Mean calibrated top probability of the latest drift window.",
    _VERSION,
    multiprocess_mode="mostrecent",
)
DRIFT_UNKNOWN_RATE = Gauge(
    "imgcls_drift_unknown_rate",
    "Share of unknown answers in the latest drift window.",
    _VERSION,
    multiprocess_mode="mostrecent",
)
DRIFT_MIN_P_VALUE = Gauge(
    "imgcls_drift_min_p_value",
    "Smallest p-value of the latest drift window's tests.",
    _VERSION,
    multiprocess_mode="mostrecent",
)


# A made-up method would otherwise start a new time series on every request.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def init_app(app: Flask) -> None:
    """Time and count every request the app answers."""
    app.before_request(_start_timer)
    app.after_request(_record_request)


def _start_timer() -> None:
    g.request_started = time.perf_counter()


def _record_request(response):
    route = request.url_rule.rule if request.url_rule else "unmatched"
    method = request.method if request.method in KNOWN_METHODS else "other"
    REQUESTS.labels(route, method, str(response.status_code)).inc()
    if "request_started" in g:
        LATENCY.labels(route).observe(time.perf_counter() - g.request_started)
    return response


def model_switched(slot: str, previous, current) -> None:
    """Record which model version a slot serves now (`current` None: the slot was emptied)."""
    if previous is not None:
        MODEL_LOADED.labels(slot, str(previous.id), previous.name, str(previous.version)).set(0)
    if current is not None:
        MODEL_LOADED.labels(slot, str(current.id), current.name, str(current.version)).set(1)


def drift_window(model, estimated_accuracy: float, unknown_rate: float, min_p_value: float) -> None:
    """Record a model version's latest drift window (`model`: anything with id, name and version)."""
    labels = (str(model.id), model.name, str(model.version))
    DRIFT_ESTIMATED_ACCURACY.labels(*labels).set(estimated_accuracy)
    DRIFT_UNKNOWN_RATE.labels(*labels).set(unknown_rate)
    DRIFT_MIN_P_VALUE.labels(*labels).set(min_p_value)


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type, aggregated over workers when multi-process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
