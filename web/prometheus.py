"""Prometheus metrics of the HTTP edge: requests by route, method and status, and their latency.

`init_app` times every request of an app and counts it. The metrics of what is served (model
calls, slots, drift) are in monitoring/metrics.py, which also makes the `/metrics` text.
"""

from __future__ import annotations

import time

from flask import Flask, g, request
from prometheus_client import Counter, Histogram

REQUESTS = Counter("imgcls_http_requests_total", "HTTP requests answered.", ["route", "method", "status"])
LATENCY = Histogram(
    "imgcls_http_request_duration_seconds",
    "Time from request to response.",
    ["route"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
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
