"""Image preprocessing and inference: turn uploaded bytes into model input and probabilities.

The same preprocessing serves the web app, the CLI and `train.py`, so a model sees pixels
prepared the same way in training and in serving.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from app_errors import AppError
from inference.ood import with_pooled_features
from registry.model_spec import ModelSpec

# Formats a browser photo upload can reasonably be; anything else (PDF, EPS, SVG...) is refused
# before Pillow hands it to a plug-in.
ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
DEFAULT_MAX_PIXELS = 40_000_000

# How each input contract maps 8-bit pixels to the model's input range.
INPUT_SCALES = {
    "unit": (1 / 255.0, 0.0),  # [0, 1]: the seed document's x / 255
    "raw": (1.0, 0.0),  # [0, 255]
    "symmetric": (2 / 255.0, -1.0),  # [-1, 1]
}
OUTPUT_KINDS = ("logits", "probabilities")
# Test-time augmentation: the views of an image the model sees, and their weights in the average
# of logits. "flip-translate" is airbench94's level 2: the image and its mirror (weight 1/4 each),
# and both of them shifted one pixel up-left and down-right with reflect padding (1/8 each).
TTA_MODES = ("none", "flip", "flip-translate")


class ImageError(AppError, ValueError):
    """An upload that cannot be turned into model input; `code` says why (the web edge maps it to a status)."""

    code = "bad_image"


class ModelOutputError(AppError, RuntimeError):
    """The model answered with NaN or infinity: a fault of the model, not of the upload."""

    code = "model_output"


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily (header only), refusing non-images and oversize pixel counts."""
    if not data:
        raise ImageError("The file is empty.", "empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError(
                f"The file is not an image this service reads (accepted: {', '.join(ACCEPTED_FORMATS)}).",
                "unsupported_media_type",
            ) from exc
        raise ImageError(f"The image has too many pixels: the limit is {max_pixels:,}.", "too_many_pixels") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError("The image file is corrupt or truncated.", "corrupt_image") from exc
    if image.width * image.height > max_pixels:
        raise ImageError(
            f"The image has too many pixels ({image.width}x{image.height}): the limit is {max_pixels:,}.",
            "too_many_pixels",
        )
    return image


# Single-channel modes wider than 8 bits: converted with integer arithmetic on a reduced image.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _reduce_factor(size: tuple[int, int], min_side: int) -> int:
    """The largest whole factor that keeps both sides at least `min_side`."""
    return max(1, min(size) // max(min_side, 1))


def _block_mean(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Average `factor` x `factor` blocks; the sum accumulates block by block, not in a
    full-size float copy."""
    height, width = (pixels.shape[0] // factor) * factor, (pixels.shape[1] // factor) * factor
    blocks = pixels[:height, :width].reshape(height // factor, factor, width // factor, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32)


def _wide_to_rgb(image: Image.Image, factor: int) -> Image.Image:
    """16-bit and 32-bit grey to 8-bit RGB, reduced by `factor` before any arithmetic."""
    if image.mode.startswith("I;16"):
        small = _block_mean(np.asarray(image), factor) / np.float32(257)  # 65535 -> 255
    else:
        # Pillow reduces 32-bit "I" and "F" natively; the stretch to 0..255 is then done on the
        # small image only.
        small = np.asarray(image.reduce(factor) if factor > 1 else image, dtype=np.float32)
        low, high = float(small.min()), float(small.max())
        small = (small - low) * np.float32(255.0 / (high - low)) if high > low else np.zeros_like(small)
    return Image.fromarray(np.clip(small, 0, 255).round().astype(np.uint8), "L").convert("RGB")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any 8-bit Pillow mode to RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _reduced(image: Image.Image, factor: int) -> Image.Image:
    """Shrink by a whole factor (a box filter, cheap) so later conversions touch few pixels."""
    if factor <= 1:
        return image
    try:
        return image.reduce(factor)
    except ValueError:  # modes Pillow cannot reduce (palette, 1-bit) are converted first
        return _to_rgb(image).reduce(factor)


def _decode_rgb(image: Image.Image, min_side: int) -> Image.Image:
    """Decode an opened image to upright RGB, reduced so both sides stay at least `min_side`.

    JPEG is reduced while decoding (draft mode); other formats right after, before any
    conversion, so no full-size copy beyond the decoded image itself is made.
    """
    if image.format == "JPEG":
        # Draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale: a 12-megapixel photo then
        # costs milliseconds. Both sides stay at least `min_side` so no detail is invented.
        image.draft("RGB", (min_side, min_side))
    try:
        image.load()
        factor = _reduce_factor(image.size, min_side)
        rgb = _wide_to_rgb(image, factor) if image.mode in WIDE_MODES else _to_rgb(_reduced(image, factor))
        rgb.info = image.info  # the EXIF orientation travels with the reduced copy
        return ImageOps.exif_transpose(rgb)
    except Image.DecompressionBombError as exc:
        raise ImageError("The image has too many pixels.", "too_many_pixels") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError("The image file is corrupt or truncated.", "corrupt_image") from exc


def thumbnail_jpeg(rgb: Image.Image, side: int) -> bytes:
    """A small JPEG of a decoded image, for the result page and the history."""
    small = rgb.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    # Rebuilt from the pixels alone: no EXIF, comment or other metadata of the upload survives.
    small = Image.frombytes("RGB", small.size, small.tobytes())
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def decode_side(size: tuple[int, int], keep_side: int = 0) -> int:
    """The smallest side a decoded image keeps: twice the model input (for the crop), or
    `keep_side` for a thumbnail or a heat-map overlay."""
    return max(max(size) * 2, keep_side)


def open_for_decoding(data: bytes, min_side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes (header only) set up for decoding: a JPEG is put in draft mode, so its
    `size` is then what decoding will produce, the figure a request's pixel budget counts."""
    image = open_image(data, max_pixels)
    if image.format == "JPEG":
        image.draft("RGB", (min_side, min_side))
    return image


def decode_rgb(image: Image.Image, size: tuple[int, int], keep_side: int = 0) -> Image.Image:
    """Decode an opened image to upright RGB, with at least `keep_side` pixels a side left for a
    thumbnail or an overlay, and enough for model input of `size`."""
    return _decode_rgb(image, decode_side(size, keep_side))


def model_input(rgb: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """Model input (uint8 HxWx3) of a decoded image: centre-crop to the aspect ratio, resize."""
    return np.asarray(ImageOps.fit(rgb, size, method=Image.Resampling.LANCZOS), dtype=np.uint8)


def decode_upload(
    data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS, thumbnail_side: int = 0
) -> tuple[np.ndarray, bytes | None]:
    """Decode an upload once into model input (uint8 HxWx3) and, if asked, a JPEG thumbnail."""
    image = open_for_decoding(data, decode_side(size, thumbnail_side), max_pixels)
    rgb = decode_rgb(image, size, thumbnail_side)
    return model_input(rgb, size), thumbnail_jpeg(rgb, thumbnail_side) if thumbnail_side else None


def decode_image(data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into a uint8 HxWx3 array of the given (width, height): orient, convert,
    centre-crop to the aspect ratio, resize with antialiasing."""
    return decode_upload(data, size, max_pixels)[0]


def scale_pixels(batch: np.ndarray, input_scale: str) -> np.ndarray:
    """Map uint8 pixels to the float range the model was trained on."""
    multiplier, offset = INPUT_SCALES[input_scale]
    return batch.astype(np.float32) * np.float32(multiplier) + np.float32(offset)


def tta_views(batch: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """The views of an N x H x W x C batch stacked as V*N images, and their V weights."""
    mirrored = [batch, batch[:, :, ::-1, :]]
    if mode == "none":
        return batch, np.ones(1)
    if mode == "flip":
        return np.concatenate(mirrored), np.full(2, 0.5)
    padded = np.pad(batch, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = batch.shape[1:3]
    shifted = [padded[:, :height, :width], padded[:, 2 : height + 2, 2 : width + 2]]
    views = mirrored + [view for image in shifted for view in (image, image[:, :, ::-1, :])]
    return np.concatenate(views), np.array([0.25, 0.25, 0.125, 0.125, 0.125, 0.125])


def average_views(outputs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average over views of V*N model outputs (as `tta_views` stacked them): N rows."""
    return np.tensordot(weights, outputs.reshape(len(weights), -1, *outputs.shape[1:]), axes=1)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass
class Prediction:
    """Probabilities for one image, ranked, with the decision made on them (see inference/calibration.py)
    and the out-of-distribution score when the model has one."""

    probabilities: dict[str, float]
    decision: str = "confident"
    ood_score: float | None = None
    ranked: list[tuple[str, float]] = field(init=False)
    # The last OOD layer's pooled features (drift monitoring projects them); None without.
    features: np.ndarray | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.ranked = sorted(self.probabilities.items(), key=lambda item: item[1], reverse=True)

    @property
    def top_class(self) -> str:
        return self.ranked[0][0]

    @property
    def top_probability(self) -> float:
        return self.ranked[0][1]


@dataclass(frozen=True)
class Scores:
    """A batch's calibrated probabilities (N x classes), OOD scores (N, or None) and the last OOD
    layer's pooled features (N x channels, or None); slicing gives the rows of some images, as the
    micro-batcher hands each request its own."""

    probabilities: np.ndarray
    ood_scores: np.ndarray | None = None
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.probabilities)

    def __getitem__(self, rows: slice) -> Scores:
        return Scores(
            self.probabilities[rows],
            None if self.ood_scores is None else self.ood_scores[rows],
            None if self.features is None else self.features[rows],
        )


# A model call: a float32 batch of model input in, [output, *pooled features of each feature layer] out.
Forward = Callable[[np.ndarray], list]


def keras_forward(model, input_shape: tuple[int, ...], feature_layers: tuple[str, ...]) -> Forward:
    """A Keras model's call as one compiled TensorFlow function."""
    import tensorflow as tf

    served = with_pooled_features(model, feature_layers) if feature_layers else model
    signature = tf.TensorSpec([None, *input_shape], tf.float32)
    infer = tf.function(lambda batch: served(batch, training=False), input_signature=[signature])
    return lambda batch: list(infer(batch)) if feature_layers else [infer(batch)]


class Predictor:
    """A model called through one function; safe to share between threads.

    The call is a Keras model's compiled with TensorFlow (`model`), or any `forward` giving the
    same outputs (the web worker's: inference/lite_engine.LiteEngine.forward, no TensorFlow). With
    a `calibration` (calibration.Calibration) it also returns the pooled features its OOD score
    needs (or those of `feature_layers`, for fitting one), and probabilities are the calibrated
    ones; without, plain softmax.
    """

    def __init__(
        self,
        model,
        spec: ModelSpec,
        calibration=None,
        feature_layers: tuple[str, ...] | None = None,
        forward: Forward | None = None,
    ):
        self.model = model
        self.spec = spec
        self.calibration = calibration
        if feature_layers is None:
            feature_layers = calibration.feature_layers if calibration is not None else ()
        self.feature_layers = tuple(feature_layers)
        self._forward = forward or keras_forward(model, tuple(spec.input_shape), self.feature_layers)

    def warm_up(self) -> None:
        """Trace and run the function once so no request pays for it."""
        height, width, channels = self.spec.input_shape
        self.predict_arrays(np.zeros((1, height, width, channels), np.uint8))

    def infer(self, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Log-scores (N x classes: logits, or log-probabilities for a softmax model) and the
        pooled features of each feature layer, each averaged over the test-time views."""
        batch, weights = tta_views(scale_pixels(images, self.spec.input_scale), self.spec.tta)
        outputs = [np.asarray(o, dtype=np.float64) for o in self._forward(batch)]
        if not all(np.isfinite(o).all() for o in outputs):
            raise ModelOutputError("The model produced an invalid (non-finite) output for this image.")
        if self.spec.output_kind == "probabilities":
            outputs[0] = np.log(np.clip(outputs[0], 1e-12, None))
        averaged = [average_views(o.reshape(len(o), -1), weights) for o in outputs]
        return averaged[0], averaged[1:]

    def score_arrays(self, images: np.ndarray) -> Scores:
        """Probabilities and OOD scores for a uint8 batch N x H x W x C."""
        if len(images) == 0:
            return Scores(np.zeros((0, len(self.spec.class_names)), np.float32))
        logits, features = self.infer(images)
        if self.calibration is None:
            return Scores(softmax(logits).astype(np.float32))
        return Scores(
            self.calibration.probabilities(logits).astype(np.float32),
            self.calibration.ood_scores(logits, features),
            features[-1] if features else None,
        )

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N x classes) for a uint8 batch N x H x W x C."""
        return self.score_arrays(images).probabilities


def to_predictions(class_names: tuple[str, ...], scores: Scores, calibration=None) -> list[Prediction]:
    """One ranked Prediction per image, with its decision when a calibration is given."""
    predictions = []
    for i, row in enumerate(scores.probabilities):
        ood_score = None if scores.ood_scores is None else float(scores.ood_scores[i])
        decision = calibration.decide(float(row.max()), ood_score) if calibration is not None else "confident"
        probabilities = {name: float(p) for name, p in zip(class_names, row, strict=True)}
        features = None if scores.features is None else scores.features[i]
        predictions.append(Prediction(probabilities, decision, ood_score, features))
    return predictions
