"""Drawing a Grad-CAM map over the photo as it was sent (Pillow and numpy; matplotlib's "jet"
colour map rebuilt from its definition, so a web worker does not import matplotlib), as a PNG.

The model saw the centre crop of the photo that fits its input's aspect ratio, so the map is
drawn over that crop and the rest of the photo is dimmed. The overlay is at the photo's own size
up to OVERLAY_MAX_SIDE pixels a side: a 40-megapixel photo is drawn at 1024 pixels, so its map
costs milliseconds and a few megabytes, not seconds and gigabytes.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

OVERLAY_MAX_SIDE = 1024
HEAT_OPACITY = 0.5
# matplotlib's "jet" (matplotlib._cm._jet_data): per channel, (x, value) points joined by straight
# lines. Importing matplotlib for it cost a worker about a second of start-up on the shared machine.
JET_POINTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
COLOURS = 256  # entries of the look-up table, as matplotlib's colour maps have


def _jet_table() -> np.ndarray:
    """The 256 x 3 uint8 table matplotlib's colormaps["jet"](x, bytes=True) reads from."""
    positions = np.linspace(0.0, 1.0, COLOURS)
    channels = [np.interp(positions, *zip(*JET_POINTS[name], strict=True)) for name in ("red", "green", "blue")]
    return (np.clip(np.stack(channels, axis=1), 0.0, 1.0) * 255).astype(np.uint8)


JET_TABLE = _jet_table()


def colour(values: np.ndarray) -> np.ndarray:
    """RGB bytes (... x 3) of values in [0, 1], as matplotlib's colour map indexes its table."""
    index = np.asarray(values, np.float32) * np.float32(COLOURS)
    index[index == COLOURS] = COLOURS - 1
    return JET_TABLE[np.clip(index, 0, COLOURS - 1).astype(np.intp)]


def bounded(photo: Image.Image, side: int) -> Image.Image:
    """The photo at its own size, or shrunk to fit `side` x `side`."""
    if max(photo.size) <= side:
        return photo
    small = photo.copy()
    small.thumbnail((side, side), Image.Resampling.BILINEAR)
    return small


def fit_box(photo_size: tuple[int, int], input_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centre crop (left, top, right, bottom) of the photo that `ImageOps.fit` turns into the
    model's input of `input_size` (width, height)."""
    width, height = photo_size
    ratio = input_size[0] / input_size[1]
    crop_width, crop_height = (height * ratio, height) if width / height >= ratio else (width, width / ratio)
    left, top = (width - crop_width) / 2, (height - crop_height) / 2
    return round(left), round(top), round(left + crop_width), round(top + crop_height)


def overlay(photo: Image.Image, grid: np.ndarray, input_size: tuple[int, int]) -> Image.Image:
    """The heat map (`grid`, floats in [0, 1]) blended over the part of `photo` the model saw."""
    box = fit_box(photo.size, input_size)
    crop_size = (max(1, box[2] - box[0]), max(1, box[3] - box[1]))
    heat = Image.fromarray(np.asarray(grid, dtype=np.float32), "F").resize(crop_size, Image.Resampling.BILINEAR)
    colours = Image.fromarray(colour(np.clip(np.asarray(heat), 0.0, 1.0)), "RGB")
    result = Image.blend(photo, Image.new("RGB", photo.size, (128, 128, 128)), 0.6)  # outside the crop: dimmed
    result.paste(Image.blend(photo.crop(box), colours, HEAT_OPACITY), box[:2])
    return result


def png_bytes(image: Image.Image) -> bytes:
    # Level 1 compresses a 1024-pixel overlay several times faster than the default, a little larger.
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_png(photo: Image.Image, grid: np.ndarray, input_size: tuple[int, int]) -> bytes:
    """The overlay of `grid` on `photo`, as PNG bytes."""
    return png_bytes(overlay(photo, grid, input_size))
