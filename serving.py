"""Per-process serving state: the active model, loaded once and swapped when another is activated.

A request takes one `LoadedModel` reference and uses it for all its images, so every answer comes
from one whole model even while another version is being activated.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

import heatmap
import model_store
import monitoring
from batching import MicroBatcher
from calibration import Calibration
from database import db
from explain import Explainer, NoExplanation, Unexplainable, explainer_for
from model_store import ModelCalibration, ModelStoreError, ModelVersion
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
    explainer: Explainer | Unexplainable
    batcher: MicroBatcher | None = None
    calibrated_at: datetime | None = None

    @property
    def key(self) -> tuple:
        """What identifies the served state in the registry: the version and its calibration."""
        return self.id, self.sha256, self.calibrated_at

    @property
    def calibration(self) -> Calibration:
        return self.predictor.calibration

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.predictor.spec.class_names

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "version": self.version, "sha256": self.sha256}

    def predict(self, images: np.ndarray) -> list[Prediction]:
        """Ranked predictions for a uint8 batch, through the batcher when there is one."""
        if self.batcher is not None:
            scores = self.batcher(images)
        else:
            monitoring.BATCH_SIZE.observe(len(images))
            scores = self.predictor.score_arrays(images)
        monitoring.IMAGES.inc(len(images))
        return to_predictions(self.class_names, scores, self.calibration)

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
    """Rehydrate a registry row to a file, load it in safe mode (its probe outputs checked), warm it up."""
    model = model_store.load_keras_model(model_store.served_file(row, directory))
    spec = spec_of(row)
    predictor = Predictor(model, spec, Calibration.from_record(model_store.get_full_calibration(row.id)))
    predictor.warm_up()
    explainer = explainer_for(model, spec, (row.metrics or {}).get("explain_layer"))
    batcher = None
    if batching.enabled:
        batcher = MicroBatcher(
            predictor.score_arrays, batching.max_batch, batching.max_wait_ms, monitoring.BATCH_SIZE.observe
        )
    return LoadedModel(row.id, row.name, row.version, row.sha256, predictor, explainer, batcher, calibrated_at)


class ModelHolder:
    """Keeps this process's loaded model in step with the registry's active row.

    The registry is asked for the active id at most every `poll_seconds`; a change loads the new
    version beside the old one and swaps the reference. A version that fails to load is reported
    (`error`) while the last good model keeps serving.
    """

    def __init__(
        self,
        directory: Path,
        poll_seconds: float = 1.0,
        batching: BatchingConfig = BatchingConfig(),
    ):
        self.directory = directory
        self.poll_seconds = poll_seconds
        self.batching = batching
        self.error: str | None = None
        self._loaded: LoadedModel | None = None
        self._failed: tuple | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def current(self) -> LoadedModel | None:
        """The model to answer with now (refreshing from the registry when due)."""
        if self._loaded is None or time.monotonic() - self._checked_at >= self.poll_seconds:
            self.refresh()
        return self._loaded

    def refresh(self) -> None:
        """Load the registry's active version if it is not the one in hand.

        Only the very first load makes other threads wait; later, while one thread loads a new
        version, the others keep answering with the model in hand.
        """
        if not self._lock.acquire(blocking=self._loaded is None):
            return
        try:
            self._checked_at = time.monotonic()
            # A new calibration of the served model counts as a change: it is reloaded with it.
            active = db.session.execute(
                select(ModelVersion.id, ModelVersion.sha256, ModelCalibration.created_at)
                .outerjoin(ModelCalibration, ModelCalibration.model_id == ModelVersion.id)
                .where(ModelVersion.is_active.is_(True))
            ).first()
            db.session.rollback()  # end the read transaction so the next poll sees new commits
            if active is None:
                self.error = None if self._loaded else "no model is active: import one with `flask models import`"
                return
            model_id, sha, calibrated_at = active
            if self._loaded is not None and self._loaded.key == (model_id, sha, calibrated_at):
                self.error = None
                return
            if (sha, calibrated_at) != self._failed:
                self._load(model_id, sha, calibrated_at)
        finally:
            self._lock.release()

    def _load(self, model_id: int, sha: str, calibrated_at) -> None:
        try:
            row = db.session.get(ModelVersion, model_id)
            if row is None:
                raise ModelStoreError(f"model {model_id} was deleted while being activated")
            loaded = load_version(row, self.directory, self.batching, calibrated_at)
        except Exception as exc:  # a disk, TensorFlow or registry failure: keep the last good model
            self._failed = (sha, calibrated_at)
            self.error = f"the active model (id {model_id}) cannot be served: {exc}"
            log.error(self.error)
            return
        finally:
            db.session.rollback()
        previous, self._loaded = self._loaded, loaded
        if previous is not None:
            previous.close()  # requests still holding it finish on it; new ones use `loaded`
        monitoring.model_switched(previous, loaded)
        self._failed = None
        self.error = None
        log.info("serving model %s (%s v%s)", loaded.id, loaded.name, loaded.version)


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
    of the top class when they were asked for, and its id in the prediction history once recorded."""

    filename: str
    image_sha256: str
    prediction: Prediction
    thumbnail: bytes | None = None
    history_id: int | None = None
    saliency: Saliency | None = None


@dataclass(frozen=True)
class Classification:
    """The answer for a request's images, in the order sent, and the time it took; when maps were
    asked for and the model has none, `no_explanation` says why."""

    images: list[ClassifiedImage]
    elapsed_ms: float
    no_explanation: str | None = None


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
class _Decoded:
    pixels: np.ndarray
    thumbnail: bytes | None
    photo: Image.Image | None


def _decode(
    upload: Upload, image: Image.Image, size: tuple[int, int], thumbnail_side: int, explain_side: int
) -> _Decoded:
    try:
        rgb = decode_rgb(image, size, max(thumbnail_side, explain_side))
    except ImageError as exc:
        raise ImageError(f"{upload.filename}: {exc.message}", exc.code) from exc
    thumbnail = thumbnail_jpeg(rgb, thumbnail_side) if thumbnail_side else None
    return _Decoded(model_input(rgb, size), thumbnail, heatmap.bounded(rgb, explain_side) if explain_side else None)


def classify(
    uploads: list[Upload], loaded: LoadedModel, budget: DecodeBudget, thumbnail_side: int = 0, explain_side: int = 0
) -> Classification:
    """Decode every upload within the budget and predict them in one model call; an ImageError
    names the file at fault. With `explain_side`, each image also gets the saliency map of its
    top class, drawn over the photo at most `explain_side` pixels a side (one more call, for the
    whole batch)."""
    started = time.perf_counter()
    size = loaded.predictor.spec.image_size
    opened = _open_within_budget(uploads, decode_side(size, max(thumbnail_side, explain_side)), budget)
    decoded = []
    for upload, image in zip(uploads, opened, strict=True):
        with budget.decodes:  # a decoded image is the costly part: few at once per process
            decoded.append(_decode(upload, image, size, thumbnail_side, explain_side))
    batch = np.stack([item.pixels for item in decoded])
    predictions = loaded.predict(batch)
    saliencies: list[Saliency | None] = [None] * len(uploads)
    no_explanation = None
    if explain_side:
        try:
            saliencies = _saliencies(loaded, batch, [p.top_class for p in predictions], decoded)
        except NoExplanation as exc:
            no_explanation = exc.message
    images = [
        ClassifiedImage(upload.filename, model_store.sha256_of(upload.data), prediction, item.thumbnail, None, saliency)
        for upload, prediction, item, saliency in zip(uploads, predictions, decoded, saliencies, strict=True)
    ]
    return Classification(images, (time.perf_counter() - started) * 1000, no_explanation)


def _saliencies(loaded: LoadedModel, batch: np.ndarray, class_names: list[str], decoded: list[_Decoded]) -> list:
    grids = loaded.explain(batch, class_names)
    size = loaded.predictor.spec.image_size
    return [
        Saliency(name, grid, heatmap.overlay_png(item.photo, grid, size))
        for name, grid, item in zip(class_names, grids, decoded, strict=True)
    ]


def explain_image(loaded: LoadedModel, data: bytes, class_name: str, budget: DecodeBudget, side: int) -> Saliency:
    """The saliency map of one class for one image (a recorded thumbnail, say)."""
    upload = Upload("image", data)
    size = loaded.predictor.spec.image_size
    (image,) = _open_within_budget([upload], decode_side(size, side), budget)
    with budget.decodes:
        item = _decode(upload, image, size, 0, side)
    return _saliencies(loaded, item.pixels[None], [class_name], [item])[0]
