"""Per-process serving state: models held by named slot, loaded off the request path, and the
decode-once path from an upload to answers.

A slot ("champion" today: the registry's active version) holds one `LoadedModel`. Only
`ModelSlots.refresh` reads the registry and loads; a `RegistryPoller` thread runs it, never a
request. A request takes one `LoadedModel` reference and uses it for all its images, so every
answer comes from one whole model even while another version is being loaded. An upload is
decoded once into a `DecodedUpload` that any model of a prepared input size can score.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

import model_store
from database import db
from inference import heatmap
from inference.batching import MicroBatcher
from inference.calibration import Calibration
from inference.explain import NoExplanation, Unexplainable
from inference.image_statistics import ImageStatistics, image_statistics
from inference.lite_engine import LiteEngine, LiteExplainer, check_calibration_fits, explainer_of
from model_store import ModelCalibration, ModelStoreError, ModelVersion
from monitoring import metrics
from predictor import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ModelSpec,
    Prediction,
    Predictor,
    decode_rgb,
    decode_side,
    model_input,
    open_for_decoding,
    thumbnail_jpeg,
    to_predictions,
)

log = logging.getLogger(__name__)

# The engine's XNNPACK threads per model. One: gunicorn's workers (one per core) already keep the
# cores busy with concurrent requests, and a second thread per call, waiting on a core that another
# worker holds, measured no faster on 2 cores (docs/lite-engine.md, "Threads and batches").
ENGINE_THREADS = 1
# The slot that answers requests: the registry's active version.
CHAMPION = "champion"
# What identifies a served state in the registry: a version's id, sha256 and calibration time.
SlotKey = tuple[int, str, datetime | None]


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of concurrent requests; `enabled=False` calls the model per request."""

    enabled: bool = False
    max_batch: int = 64
    max_wait_ms: float = 2.0


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to answer, with the registry facts a response reports."""

    id: int
    name: str
    version: int
    sha256: str
    predictor: Predictor
    explainer: LiteExplainer | Unexplainable
    batcher: MicroBatcher | None = None
    calibrated_at: datetime | None = None
    # The same engine answering what the head's dense layer reads (LoadedModel.features).
    penultimate: Predictor | None = None

    @property
    def key(self) -> SlotKey:
        """What identifies the served state in the registry: the version and its calibration."""
        return self.id, self.sha256, self.calibrated_at

    @property
    def calibration(self) -> Calibration:
        return self.predictor.calibration

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.predictor.spec.class_names

    @property
    def input_size(self) -> tuple[int, int]:
        """The (width, height) of the images the model takes."""
        return self.predictor.spec.image_size

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "version": self.version, "sha256": self.sha256}

    def predict(self, images: np.ndarray) -> list[Prediction]:
        """Ranked predictions for a uint8 batch, through the batcher when there is one."""
        if self.batcher is not None:
            scores = self.batcher(images)
        else:
            metrics.BATCH_SIZE.observe(len(images))
            scores = self.predictor.score_arrays(images)
        metrics.IMAGES.inc(len(images))
        return to_predictions(self.class_names, scores, self.calibration)

    def score(self, decoded: Sequence[DecodedUpload]) -> list[Prediction]:
        """Ranked predictions for decoded uploads, in one model call, from their input at this model's size."""
        return self.predict(self.batch(decoded))

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate features (N x features) for a uint8 batch: the label queue keeps a round's
        images unlike one another by them (LiteEngine.penultimate_forward), over the views."""
        return self.penultimate.infer(images)[1][0]

    def batch(self, decoded: Sequence[DecodedUpload]) -> np.ndarray:
        """The decoded uploads' inputs at this model's size, as one uint8 batch."""
        return np.stack([item.pixels(self.input_size) for item in decoded])

    def explain(self, images: np.ndarray, class_names: list[str]) -> np.ndarray:
        """Grad-CAM maps for a uint8 batch, one class per image; NoExplanation when there can be none."""
        unknown = [name for name in class_names if name not in self.class_names]
        if unknown:
            raise NoExplanation(f"{unknown[0]!r} is not one of the model's classes.", "unknown_class")
        return self.explainer.explain(images, [self.class_names.index(name) for name in class_names])

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()


def spec_of(row: ModelVersion) -> ModelSpec:
    """What the predictor needs to know about a registry row's model."""
    return ModelSpec(tuple(row.class_names), tuple(row.input_shape), row.input_scale, row.output_kind, row.tta)


def load_version(
    row: ModelVersion,
    directory: Path,
    batching: BatchingConfig = BatchingConfig(),
    calibrated_at=None,
) -> LoadedModel:
    """Rehydrate a registry row's conversion for the serving engine (LiteRT: no TensorFlow in a
    web worker), load it with its calibration and explainer, warm it up."""
    path, metadata = model_store.served_engine_file(row, directory)
    record = model_store.get_full_calibration(row.id)
    try:
        check_calibration_fits(metadata, record)  # an int8 conversion's scores need their own calibration
    except ValueError as exc:
        raise ModelStoreError(f"model {row.id} cannot be served: {exc}") from exc
    engine = LiteEngine(path.read_bytes(), metadata, num_threads=ENGINE_THREADS)
    spec = spec_of(row)
    calibration = Calibration.from_record(record)
    predictor = Predictor(None, spec, calibration, forward=engine.forward(calibration.feature_layers))
    predictor.warm_up()
    explainer = explainer_of(engine, spec.input_scale)
    batcher = None
    if batching.enabled:
        batcher = MicroBatcher(
            predictor.score_arrays, batching.max_batch, batching.max_wait_ms, metrics.BATCH_SIZE.observe
        )
    penultimate = Predictor(None, spec, feature_layers=("penultimate",), forward=engine.penultimate_forward())
    return LoadedModel(
        row.id, row.name, row.version, row.sha256, predictor, explainer, batcher, calibrated_at, penultimate
    )


def registry_assignments() -> dict[str, SlotKey]:
    """Which version each slot should serve, read from the registry: the active version is the
    champion. A calibration's time is part of the key, so a new calibration reloads the model."""
    active = db.session.execute(
        select(ModelVersion.id, ModelVersion.sha256, ModelCalibration.created_at)
        .outerjoin(ModelCalibration, ModelCalibration.model_id == ModelVersion.id)
        .where(ModelVersion.is_active.is_(True))
    ).first()
    return {CHAMPION: tuple(active)} if active else {}


class ModelSlots:
    """This process's models by slot name, kept in step with what the registry assigns.

    Readers (request threads) only take references: `slot(name)` is the model a slot holds now.
    `refresh` (the poller's thread, a CLI command, a test) reads the registry in the caller's
    database session and loads every slot whose version changed beside the model in hand, then
    swaps the reference. A version that fails to load is reported (`error`) while the slot's last
    good model keeps serving; a slot the registry no longer names is emptied.
    """

    def __init__(
        self,
        directory: Path,
        batching: BatchingConfig = BatchingConfig(),
        assignments: Callable[[], Mapping[str, SlotKey]] = registry_assignments,
    ):
        self.directory = directory
        self.batching = batching
        self._assignments = assignments
        # Replaced whole, never changed in place: a reader sees the old mapping or the new one.
        self._models: Mapping[str, LoadedModel] = {}
        self._errors: dict[str, str] = {}
        self._failed: dict[str, SlotKey] = {}
        self._registry_error: str | None = None
        self._refreshed = False
        self._lock = threading.Lock()

    def slot(self, name: str = CHAMPION) -> LoadedModel | None:
        """The model a slot holds now, or None."""
        return self._models.get(name)

    def loaded(self) -> Mapping[str, LoadedModel]:
        """Every loaded slot's model, as one consistent snapshot."""
        return self._models

    def error(self, name: str = CHAMPION) -> str | None:
        """Why a slot cannot serve, or serves an older version than the registry assigns; None when all is well."""
        error = self._registry_error or self._errors.get(name)
        if error or name in self._models:
            return error
        if not self._refreshed:
            return "no model is loaded yet: the worker is loading it"
        if name == CHAMPION:
            return "no model is active: import one with `flask models import`"
        return f"no model is assigned to the {name} slot"

    def errors(self) -> dict[str, str]:
        """The slots that cannot serve their assigned version, and why."""
        return dict(self._errors)

    def refresh(self) -> None:
        """Load every slot's assigned version that is not the one in hand (needs an app context)."""
        with self._lock:
            try:
                wanted = dict(self._assignments())
                self._registry_error = None
            except SQLAlchemyError as exc:  # keep serving what is loaded; report why nothing changes
                self._registry_error = f"the model registry cannot be read: {exc.__class__.__name__}"
                log.error("%s: %s", self._registry_error, exc)
                return
            finally:
                db.session.rollback()  # end the read transaction: no snapshot is held during a load
            for name, key in wanted.items():
                self._update(name, key)
            for name in set(self._models) - set(wanted):
                self._swap(name, None)
            for name in set(self._errors) - set(wanted):
                del self._errors[name]
                self._failed.pop(name, None)
            self._refreshed = True  # only now is an empty slot empty, not still loading

    def close(self) -> None:
        """Empty every slot (the process is stopping, or a test is done)."""
        with self._lock:
            for name in list(self._models):
                self._swap(name, None)

    def _update(self, name: str, key: SlotKey) -> None:
        current = self._models.get(name)
        if current is not None and current.key == key:
            self._errors.pop(name, None)
            self._failed.pop(name, None)
            return
        if self._failed.get(name) == key:
            return  # a version that failed is retried when the registry changes, not on every poll
        model_id = key[0]
        try:
            row = db.session.get(ModelVersion, model_id)
            if row is None:
                raise ModelStoreError(f"model {model_id} was deleted while being loaded")
            loaded = load_version(row, self.directory, self.batching, key[2])
        except Exception as exc:  # a disk, engine or registry failure: keep the last good model
            self._failed[name] = key
            self._errors[name] = f"the {name} model (id {model_id}) cannot be served: {exc}"
            log.error(self._errors[name])
            return
        finally:
            db.session.rollback()
        self._swap(name, loaded)
        self._errors.pop(name, None)
        self._failed.pop(name, None)
        log.info("serving model %s (%s v%s) in the %s slot", loaded.id, loaded.name, loaded.version, name)

    def _swap(self, name: str, loaded: LoadedModel | None) -> None:
        models = dict(self._models)
        previous = models.pop(name, None)
        if loaded is not None:
            models[name] = loaded
        self._models = models
        if previous is not None:
            previous.close()  # requests still holding it finish on it; new ones take the new one
        metrics.model_switched(name, previous, loaded)


class RegistryPoller:
    """A daemon thread that calls `refresh` at once, then every `interval` seconds until stopped.

    The first round is what a new worker waits for (`wait_first_round`) before it takes traffic.
    """

    def __init__(self, refresh: Callable[[], None], interval: float):
        self._refresh = refresh
        self.interval = interval
        self._stopping = threading.Event()
        self._first_round = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the thread unless it runs (safe to call on every request: it is cheap)."""
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            # After a fork the child's copy of the thread is dead: the child starts its own.
            if (self._thread is None or not self._thread.is_alive()) and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._run, name="model-registry-poller", daemon=True)
                self._thread.start()

    def wait_first_round(self, timeout: float) -> bool:
        """Wait until the first refresh has finished (loaded or failed); False on timeout."""
        return self._first_round.wait(timeout)

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling (for good) and wait for a round under way to finish."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._refresh()
            except Exception:  # the thread must outlive any one failed round
                log.exception("refreshing the served models failed")
            self._first_round.set()
            self._stopping.wait(self.interval)


@dataclass(frozen=True)
class Upload:
    """An uploaded image: the client's file name (for display only) and its bytes."""

    filename: str
    data: bytes


def clean_filename(name: str | None, fallback: str = "image") -> str:
    """A file name safe to show: the last path part, no control characters, at most 100 characters."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return (name or fallback)[:100]


@dataclass(frozen=True)
class Saliency:
    """Where the model looked for a class: the Grad-CAM grid and its overlay on the photo (PNG)."""

    class_name: str
    grid: np.ndarray
    overlay_png: bytes


@dataclass(frozen=True)
class ClassifiedImage:
    """One image's answer: its file name and hash, the prediction, a thumbnail and a saliency map
    of the top class when they were asked for, its id in the prediction history once recorded, and
    the statistics of the model's input (drift monitoring keeps them)."""

    filename: str
    image_sha256: str
    prediction: Prediction
    thumbnail: bytes | None = None
    history_id: int | None = None
    saliency: Saliency | None = None
    statistics: ImageStatistics | None = None


@dataclass(frozen=True)
class Classification:
    """The answer for a request's images, in the order sent, and the time it took; when maps were
    asked for and the model has none, `no_explanation` says why."""

    images: list[ClassifiedImage]
    elapsed_ms: float
    no_explanation: str | None = None
    # The decoded uploads, for a second model scoring them off the response path (web/rollout.py).
    decoded: Sequence[DecodedUpload] = ()


# Pixels one request may decode, all images together. A JPEG counts at its draft scale (a
# 12-megapixel photo costs 0.2 MP), so the budget bites on PNG, TIFF and the like, whose decoding
# costs about 0.1 s per 10 MP on one core: a 40 MP 16-bit PNG, under the per-image limit, is
# refused here from its header instead of holding a worker for seconds.
DEFAULT_MAX_REQUEST_PIXELS = 24_000_000


@dataclass(frozen=True)
class DecodeBudget:
    """What decoding may cost: pixels per image, pixels per request (counted from the headers,
    at the size decoding will produce), and how many images one process decodes at once."""

    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    decodes: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(2))


def _open_within_budget(uploads: list[Upload], min_side: int, budget: DecodeBudget) -> list:
    """Open every upload's header and refuse the request if decoding all of them would cost too much."""
    opened = []
    for upload in uploads:
        try:
            opened.append(open_for_decoding(upload.data, min_side, budget.max_image_pixels))
        except ImageError as exc:
            raise ImageError(f"{upload.filename}: {exc.message}", exc.code) from exc
    total = sum(image.width * image.height for image in opened)
    if total > budget.max_request_pixels:
        raise ImageError(
            f"The images of this request have {total:,} pixels in all: the limit is "
            f"{budget.max_request_pixels:,} per request. Send fewer or smaller images.",
            "request_too_large",
        )
    return opened


@dataclass(frozen=True)
class DecodedUpload:
    """An upload decoded once: its model input at each prepared (width, height) and that input's
    statistics, its sha256, and the thumbnail and overlay photo when asked for. Every model with
    one of the prepared input sizes scores it without decoding again."""

    filename: str
    sha256: str
    inputs: Mapping[tuple[int, int], np.ndarray]
    input_statistics: Mapping[tuple[int, int], ImageStatistics]
    thumbnail: bytes | None = None
    photo: Image.Image | None = None

    def pixels(self, size: tuple[int, int]) -> np.ndarray:
        """The uint8 H x W x 3 model input at `size`; a ValueError if it was not prepared."""
        if size not in self.inputs:
            raise ValueError(f"{self.filename} was decoded for input sizes {sorted(self.inputs)}, not {size}")
        return self.inputs[size]

    def statistics(self, size: tuple[int, int]) -> ImageStatistics:
        """Brightness, saturation and sharpness of the model input at `size`."""
        self.pixels(size)  # the same clear error for a size not prepared
        return self.input_statistics[size]


def decode_uploads(
    uploads: list[Upload],
    sizes: Iterable[tuple[int, int]],
    budget: DecodeBudget,
    thumbnail_side: int = 0,
    explain_side: int = 0,
) -> list[DecodedUpload]:
    """Decode every upload once, within the budget, into model input at each of `sizes` (the
    input sizes of the models that will score it); an ImageError names the file at fault.
    `thumbnail_side` adds a JPEG thumbnail, `explain_side` the photo a saliency map is drawn over."""
    sizes = tuple(dict.fromkeys(sizes))
    if not sizes:
        raise ValueError("decoding needs at least one model input size")
    largest = max(sizes, key=max)  # decoding keeps enough pixels for the largest input
    keep_side = max(thumbnail_side, explain_side)
    opened = _open_within_budget(uploads, decode_side(largest, keep_side), budget)
    decoded = []
    for upload, image in zip(uploads, opened, strict=True):
        with budget.decodes:  # a decoded image is the costly part: few at once per process
            try:
                rgb = decode_rgb(image, largest, keep_side)
            except ImageError as exc:
                raise ImageError(f"{upload.filename}: {exc.message}", exc.code) from exc
            decoded.append(_prepared(upload, rgb, sizes, thumbnail_side, explain_side))
    return decoded


def _prepared(
    upload: Upload, rgb: Image.Image, sizes: tuple[tuple[int, int], ...], thumbnail_side: int, explain_side: int
) -> DecodedUpload:
    """What the models and pages need from a decoded image; the full decoded image is not kept."""
    inputs = {size: model_input(rgb, size) for size in sizes}
    return DecodedUpload(
        upload.filename,
        model_store.sha256_of(upload.data),
        inputs,
        {size: image_statistics(pixels) for size, pixels in inputs.items()},
        thumbnail_jpeg(rgb, thumbnail_side) if thumbnail_side else None,
        heatmap.bounded(rgb, explain_side) if explain_side else None,
    )


def answer(
    decoded: list[DecodedUpload], loaded: LoadedModel, explain: bool = False
) -> tuple[list[ClassifiedImage], str | None]:
    """One model's ClassifiedImages for decoded uploads, in one model call; with `explain`, each
    gets the saliency map of its top class over its photo (one more call for the batch), or the
    reason there is none comes second."""
    predictions = loaded.score(decoded)
    saliencies: list[Saliency | None] = [None] * len(decoded)
    no_explanation = None
    if explain:
        try:
            saliencies = _saliencies(loaded, decoded, [p.top_class for p in predictions])
        except NoExplanation as exc:
            no_explanation = exc.message
    images = [
        ClassifiedImage(
            item.filename, item.sha256, prediction, item.thumbnail, None, saliency, item.statistics(loaded.input_size)
        )
        for item, prediction, saliency in zip(decoded, predictions, saliencies, strict=True)
    ]
    return images, no_explanation


def _saliencies(loaded: LoadedModel, decoded: list[DecodedUpload], class_names: list[str]) -> list[Saliency]:
    grids = loaded.explain(loaded.batch(decoded), class_names)
    return [
        Saliency(name, grid, heatmap.overlay_png(item.photo, grid, loaded.input_size))
        for name, grid, item in zip(class_names, grids, decoded, strict=True)
    ]


def explain_image(loaded: LoadedModel, data: bytes, class_name: str, budget: DecodeBudget, side: int) -> Saliency:
    """The saliency map of one class for one image (a recorded thumbnail, say)."""
    (item,) = decode_uploads([Upload("image", data)], [loaded.input_size], budget, explain_side=side)
    return _saliencies(loaded, [item], [class_name])[0]
