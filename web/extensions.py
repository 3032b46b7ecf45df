"""The app's Flask extensions, all bound to an app here (`init_app`): the database and its
migrations (database.py), CSRF protection, request limits, log-in and the models being served.

`model_serving` is to the served models what `db` is to the database: created once here, bound
to an app with `init_app`, and reached through its accessors. It is the one interface pages, the
API, the CLI and the benchmarks use: `slot(name)` for a model, `decode` and `classify` for
uploads, `status()` for readiness, `refresh()` to load what the registry assigns now.

Loading never happens on a request thread. With MODEL_POLL_SECONDS > 0 a background thread per
process (started by gunicorn's post_worker_init, or by the first request under another server)
polls the registry in its own app context and database session; with 0 there is no thread and
models load only on an explicit `refresh()` (one-shot commands and the tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

import database
import serving
from serving import CHAMPION, BatchingConfig, DecodeBudget, DecodedUpload, LoadedModel, ModelSlots, RegistryPoller
from web import rollout
from web.errors import WebError

csrf = CSRFProtect()
# Storage, headers and on/off come from the RATELIMIT_* settings; the limits are in web/limits.py.
limiter = Limiter(key_func=get_remote_address)
# Who is asking: the loaders are web/auth.py's.
login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Log in to use the classifier."


@dataclass(frozen=True)
class AppServing:
    """One app's serving state: its slots, its decoding budget and its registry poller (None
    when MODEL_POLL_SECONDS is 0)."""

    slots: ModelSlots
    budget: DecodeBudget
    poller: RegistryPoller | None


class ModelServing:
    """Per app: the served models by slot, kept in step with the registry off the request path."""

    def init_app(self, app: Flask) -> None:
        config = app.config
        batching = BatchingConfig(
            bool(config["BATCHING_ENABLED"]), int(config["BATCH_MAX_SIZE"]), float(config["BATCH_MAX_WAIT_MS"])
        )
        # The rollout's plan (web/rollout.py) is read in the same poll as the slots' versions.
        slots = ModelSlots(Path(config["MODEL_CACHE_DIR"]), batching, app.extensions["rollout"].assignments)
        poll_seconds = float(config["MODEL_POLL_SECONDS"])
        poller = RegistryPoller(lambda: self.refresh(app), poll_seconds) if poll_seconds > 0 else None
        app.extensions["model_serving"] = AppServing(
            slots,
            # Per process: gunicorn's workers each have their own budget, shared by their threads.
            DecodeBudget(
                int(config["MAX_IMAGE_PIXELS"]),
                int(config["MAX_REQUEST_PIXELS"]),
                threading.BoundedSemaphore(int(config["MAX_CONCURRENT_DECODES"])),
            ),
            poller,
        )
        if poller is not None:
            # A server other than gunicorn has no post_worker_init: its first request starts the
            # poller (and does not wait for it). CLI commands never start it.
            app.before_request(poller.start)
        # Templates read what is loaded; nothing in a render touches the registry.
        app.context_processor(lambda: {"status": self.status()})

    @property
    def _state(self) -> AppServing:
        return current_app.extensions["model_serving"]

    @property
    def slots(self) -> ModelSlots:
        """The current app's slots."""
        return self._state.slots

    @property
    def budget(self) -> DecodeBudget:
        """The current app's decoding budget."""
        return self._state.budget

    def slot(self, name: str = CHAMPION) -> LoadedModel:
        """The model a slot holds now; a `no_model` error when it holds none."""
        loaded = self.slots.slot(name)
        if loaded is None:
            raise WebError(self.slots.error(name) or "no model is loaded", "no_model")
        return loaded

    def decode(
        self,
        uploads: list[serving.Upload],
        models: Iterable[LoadedModel],
        thumbnail_side: int = 0,
        explain_side: int = 0,
    ) -> list[DecodedUpload]:
        """Decode uploads once, within this process's budget, for every model in `models`."""
        sizes = [loaded.input_size for loaded in models]
        return serving.decode_uploads(uploads, sizes, self.budget, thumbnail_side, explain_side)

    def classify(
        self,
        uploads: list[serving.Upload],
        loaded: LoadedModel,
        thumbnail_side: int = 0,
        explain_side: int = 0,
        companions: Iterable[LoadedModel] = (),
    ) -> serving.Classification:
        """Decode the uploads and answer with `loaded`, timed; with `explain_side`, saliency maps
        of the top classes drawn over the photo at most `explain_side` pixels a side. The uploads
        are decoded for the `companions` too, which score them later off the response path."""
        started = time.perf_counter()
        decoded = self.decode(uploads, [loaded, *companions], thumbnail_side, explain_side)
        images, no_explanation = serving.answer(decoded, loaded, explain=bool(explain_side))
        return serving.Classification(images, (time.perf_counter() - started) * 1000, no_explanation, decoded)

    def explain_image(self, loaded: LoadedModel, data: bytes, class_name: str, side: int) -> serving.Saliency:
        """The saliency map of one class for one image's bytes."""
        return serving.explain_image(loaded, data, class_name, self.budget, side)

    def refresh(self, app: Flask | None = None) -> None:
        """Load what the registry assigns now, in the calling thread, in an app context (and
        database session) of its own: never call it from a request."""
        app = app or current_app._get_current_object()
        with app.app_context():
            app.extensions["model_serving"].slots.refresh()

    def start(self, app: Flask, wait_seconds: float = 0) -> None:
        """Start the app's registry poller, if it has one; wait up to `wait_seconds` for its
        first round (a new worker loads before taking traffic)."""
        poller = app.extensions["model_serving"].poller
        if poller is not None:
            poller.start()
            poller.wait_first_round(wait_seconds)

    def stop(self, app: Flask) -> None:
        """Stop the app's poller and empty its slots."""
        state = app.extensions["model_serving"]
        if state.poller is not None:
            state.poller.stop()
        state.slots.close()

    def status(self) -> dict:
        """Readiness of this process: the champion that answers requests (`model`, `classes`,
        `error`) and every slot it holds."""
        slots = self.slots
        loaded, errors = slots.loaded(), slots.errors()
        champion = loaded.get(CHAMPION)
        return {
            "ready": champion is not None,
            "model": champion.describe() if champion else None,
            "classes": list(champion.class_names) if champion else [],
            "error": slots.error(CHAMPION),
            "slots": {
                name: {"model": loaded[name].describe() if name in loaded else None, "error": errors.get(name)}
                for name in sorted({*loaded, *errors})
            },
        }


model_serving = ModelServing()


def init_app(app: Flask) -> None:
    """Bind every extension to the app (the factory's one call for them)."""
    database.init_app(app)
    csrf.init_app(app)
    limiter.init_app(app)
    login_manager.init_app(app)
    rollout.init_app(app)
    model_serving.init_app(app)
