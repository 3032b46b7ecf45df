"""The model registry's file layer, Flask-free: the model file format and the legacy one it
replaced, reading either (model_formats.py), a model's serving settings (model_spec.py) and its
metrics.json (metrics_schema.py). model_store.py keeps the registry's database side, and
model_sandbox.py, which runs these in a confined child by path, stays at the top level."""
