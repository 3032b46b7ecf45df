"""The web layer: page and API blueprints, the request helpers they share, the error edge and the
Prometheus metrics (prometheus.py, which serving.py also counts model calls in)."""
