"""The web layer: page and API blueprints, the request helpers they share, and the error edge."""
