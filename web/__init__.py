"""The web layer: page and API blueprints, the request helpers they share, the error edge and the
request metrics (prometheus.py; what is served is counted in monitoring/metrics.py).
"""
