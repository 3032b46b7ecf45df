"""Flask extensions the web layer shares: CSRF protection, request limits and the model being served.

`model_serving` is to the served model what `db` is to the database: created once here, bound
to an app with `init_app`, and reached in a request through its accessors.
"""

from __future__ import annotations

import threading
from pathlib import Path

from flask import Flask, current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_wtf.csrf import CSRFProtect

from serving import BatchingConfig, DecodeBudget, LoadedModel, ModelHolder
from web.errors import WebError

csrf = CSRFProtect()
# Storage, headers and on/off come from the RATELIMIT_* settings; the limits are in web/limits.py.
limiter = Limiter(key_func=get_remote_address)


class ModelServing:
    """One ModelHolder per app, kept in step with the registry's active model."""

    def init_app(self, app: Flask) -> None:
        config = app.config
        batching = BatchingConfig(
            bool(config["BATCHING_ENABLED"]), int(config["BATCH_MAX_SIZE"]), float(config["BATCH_MAX_WAIT_MS"])
        )
        app.extensions["model_serving"] = ModelHolder(
            Path(config["MODEL_CACHE_DIR"]),
            float(config["MODEL_POLL_SECONDS"]),
            batching,
        )
        # Per process: gunicorn's workers each have their own budget, shared by their threads.
        app.extensions["decode_budget"] = DecodeBudget(
            int(config["MAX_IMAGE_PIXELS"]),
            int(config["MAX_REQUEST_PIXELS"]),
            threading.BoundedSemaphore(int(config["MAX_CONCURRENT_DECODES"])),
        )
        app.context_processor(lambda: {"status": self.status()})

    @property
    def holder(self) -> ModelHolder:
        """The current app's holder."""
        return current_app.extensions["model_serving"]

    @property
    def budget(self) -> DecodeBudget:
        """The current app's decoding budget."""
        return current_app.extensions["decode_budget"]

    def active(self) -> LoadedModel:
        """The model to answer with; a `no_model` error when none can be served."""
        loaded = self.holder.current()
        if loaded is None:
            raise WebError(self.holder.error or "No model is loaded.", "no_model")
        return loaded

    def status(self) -> dict:
        """Readiness of this process and the model it serves."""
        loaded = self.holder.current()
        return {
            "ready": loaded is not None,
            "model": loaded.describe() if loaded else None,
            "classes": list(loaded.class_names) if loaded else [],
            "error": self.holder.error,
        }


model_serving = ModelServing()
