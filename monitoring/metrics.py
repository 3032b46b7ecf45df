"""The Prometheus metrics of what the app serves: images per model call, images classified, the
model version in each serving slot, and each version's latest drift window; and the exposition
`/metrics` answers with. Flask-free: serving.py and monitoring/windows.py count here, and the web
layer's request metrics (web/prometheus.py) join them in the same registry.

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
