"""Cheap statistics of a model-input image, to watch what the served images look like (drift).

Computed on the uint8 H x W x 3 array a model is given, so two models with the same input size see
the same figures. Brightness and sharpness are on the 0-255 scale of 8-bit luma (sharpness, the
variance of the Laplacian, is the usual blur measure: near 0 for a flat or blurred image, tens of
thousands for a fine pattern); saturation is HSV saturation, 0 (grey) to 1 (pure colour).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# ITU-R BT.601 luma weights, as Pillow's convert("L") uses.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float64)


@dataclass(frozen=True)
class ImageStatistics:
    """Brightness mean and spread, mean saturation and sharpness of one image."""

    brightness_mean: float
    brightness_std: float
    saturation_mean: float
    sharpness: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def laplacian_variance(grey: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian over the pixels that have all four neighbours."""
    if min(grey.shape) < 3:
        return 0.0
    centre = grey[1:-1, 1:-1]
    laplacian = grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4 * centre
    return float(laplacian.var())


def image_statistics(pixels: np.ndarray) -> ImageStatistics:
    """The statistics of a uint8 H x W x 3 RGB image."""
    rgb = pixels.astype(np.float64)
    grey = rgb @ LUMA_WEIGHTS
    brightest, darkest = rgb.max(axis=-1), rgb.min(axis=-1)
    # HSV saturation: (max - min) / max, and 0 for black, whose hue and saturation are undefined.
    saturation = np.divide(brightest - darkest, brightest, out=np.zeros_like(brightest), where=brightest > 0)
    return ImageStatistics(
        brightness_mean=float(grey.mean()),
        brightness_std=float(grey.std()),
        saturation_mean=float(saturation.mean()),
        sharpness=laplacian_variance(grey),
    )
