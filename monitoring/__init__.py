"""Drift monitoring: a reference per model, per-prediction drift features, windows and their tests."""
