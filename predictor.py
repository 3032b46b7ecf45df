"""Image preprocessing and inference: turn uploaded bytes into model input and probabilities.

The same preprocessing serves the web app, the CLI and `train.py`, so a model sees pixels
prepared the same way in training and in serving.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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


class ImageError(ValueError):
    """An upload that cannot be turned into model input; carries the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_image"):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class ModelOutputError(RuntimeError):
    """The model answered with NaN or infinity: a fault of the model, not of the upload."""


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open image bytes lazily (header only), refusing non-images and oversize pixel counts."""
    if not data:
        raise ImageError("The file is empty.", 400, "empty_file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise ImageError(
                f"The file is not an image this service reads (accepted: {', '.join(ACCEPTED_FORMATS)}).",
                415,
                "unsupported_media_type",
            ) from exc
        raise ImageError(
            f"The image has too many pixels: the limit is {max_pixels:,}.", 413, "too_many_pixels"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError("The image file is corrupt or truncated.", 400, "corrupt_image") from exc
    if image.width * image.height > max_pixels:
        raise ImageError(
            f"The image has too many pixels ({image.width}x{image.height}): the limit is {max_pixels:,}.",
            413,
            "too_many_pixels",
        )
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            pixels = pixels / 257.0
        else:
            low, high = float(pixels.min()), float(pixels.max())
            pixels = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_rgb(image: Image.Image, min_side: int) -> Image.Image:
    """Decode an opened image to upright RGB, at reduced JPEG scale when `min_side` allows."""
    if image.format == "JPEG":
        # Draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale: a 12-megapixel photo then
        # costs milliseconds. Both sides stay at least `min_side` so no detail is invented.
        image.draft("RGB", (min_side, min_side))
    try:
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:
        raise ImageError("The image has too many pixels.", 413, "too_many_pixels") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError("The image file is corrupt or truncated.", 400, "corrupt_image") from exc


def thumbnail_jpeg(rgb: Image.Image, side: int) -> bytes:
    """A small JPEG of a decoded image, for the result page and the history."""
    small = rgb.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def decode_upload(
    data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS, thumbnail_side: int = 0
) -> tuple[np.ndarray, bytes | None]:
    """Decode an upload once into model input (uint8 HxWx3) and, if asked, a JPEG thumbnail."""
    rgb = _decode_rgb(open_image(data, max_pixels), max(max(size) * 2, thumbnail_side))
    pixels = np.asarray(ImageOps.fit(rgb, size, method=Image.Resampling.LANCZOS), dtype=np.uint8)
    return pixels, thumbnail_jpeg(rgb, thumbnail_side) if thumbnail_side else None


def load_image(data: bytes, size: tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
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


@dataclass(frozen=True)
class ModelSpec:
    """What the predictor needs to know about a model beyond its weights."""

    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # height, width, channels
    input_scale: str = "unit"
    output_kind: str = "logits"
    tta: str = "none"

    @property
    def image_size(self) -> tuple[int, int]:
        """Target (width, height) for Pillow."""
        return self.input_shape[1], self.input_shape[0]


@dataclass
class Prediction:
    """Probabilities for one image, ranked."""

    probabilities: dict[str, float]
    ranked: list[tuple[str, float]] = field(init=False)

    def __post_init__(self) -> None:
        self.ranked = sorted(self.probabilities.items(), key=lambda item: item[1], reverse=True)

    @property
    def top_class(self) -> str:
        return self.ranked[0][0]

    @property
    def top_probability(self) -> float:
        return self.ranked[0][1]


class Predictor:
    """A loaded Keras model called through one compiled function; safe to share between threads."""

    def __init__(self, model, spec: ModelSpec):
        import tensorflow as tf

        self.model = model
        self.spec = spec
        height, width, channels = spec.input_shape
        signature = tf.TensorSpec([None, height, width, channels], tf.float32)
        self._infer = tf.function(lambda batch: model(batch, training=False), input_signature=[signature])

    def warm_up(self) -> None:
        """Trace and run the function once so no request pays for it."""
        height, width, channels = self.spec.input_shape
        self.predict_arrays(np.zeros((1, height, width, channels), np.uint8))

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N x classes) for a uint8 batch N x H x W x C."""
        if len(images) == 0:
            return np.zeros((0, len(self.spec.class_names)), np.float32)
        batch, weights = tta_views(scale_pixels(images, self.spec.input_scale), self.spec.tta)
        outputs = np.asarray(self._infer(batch), dtype=np.float64)
        if not np.isfinite(outputs).all():
            raise ModelOutputError("The model produced an invalid (non-finite) output for this image.")
        if self.spec.output_kind == "probabilities":
            outputs = np.log(np.clip(outputs, 1e-12, None))
        return softmax(average_views(outputs, weights)).astype(np.float32)


def to_predictions(class_names: tuple[str, ...], rows: np.ndarray) -> list[Prediction]:
    """One ranked Prediction per row of probabilities."""
    return [Prediction({name: float(p) for name, p in zip(class_names, row, strict=True)}) for row in rows]
