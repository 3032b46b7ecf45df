"""Prometheus metrics: requests by route and status, latency, images per model call, the model served.

Under gunicorn, PROMETHEUS_MULTIPROC_DIR (set by gunicorn.conf.py before any worker starts) makes
every worker write its samples to files that `/metrics` aggregates, whichever worker answers.
"""

from __future__ import annotations

import os

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
    "1 for the model version this process serves.",
    ["model_id", "name", "version"],
    multiprocess_mode="livemax",
)


def model_switched(previous, current) -> None:
    """Record which model version the process serves now."""
    if previous is not None:
        MODEL_LOADED.labels(str(previous.id), previous.name, str(previous.version)).set(0)
    MODEL_LOADED.labels(str(current.id), current.name, str(current.version)).set(1)


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type, aggregated over workers when multi-process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
