"""Batched data augmentation, as airbench: a whole epoch of images at once, in NumPy.

Each epoch is one vectorised pass over the uint8 training array (random reflect-padded
translation, flips, cutout) before batching, so no per-image map competes with the model for the
CPU, and the same code feeds both Keras backends (TensorFlow here, JAX on a GPU for the search).
"""

from __future__ import annotations

import numpy as np

from training.recipe import Recipe


class EpochAugmenter:
    """Augmented copies of a training array, one per epoch.

    Alternating flips (airbench): each image is flipped at random once, up front, and the whole
    set is flipped on every other epoch, so every image is seen both ways within two epochs.
    """

    def __init__(self, images: np.ndarray, recipe: Recipe, rng: np.random.Generator):
        self.recipe = recipe
        self.rng = rng
        self.height, self.width = images.shape[1:3]
        if recipe.flip == "alternating":
            images = random_flips(images, rng)
        pad = recipe.translate
        self.padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect") if pad else images
        self.fill = np.round(images.reshape(-1, images.shape[-1]).mean(axis=0)).astype(images.dtype)

    def epoch(self, index: int) -> np.ndarray:
        """The augmented training images for epoch `index` (0-based)."""
        recipe = self.recipe
        images = translate(self.padded, recipe.translate, self.rng) if recipe.translate else self.padded.copy()
        if recipe.flip == "alternating" and index % 2 == 1:
            images = images[:, :, ::-1]
        elif recipe.flip == "random":
            images = random_flips(images, self.rng)
        if recipe.cutout:
            images = cut_out(images, recipe.cutout, self.fill, self.rng)
        return np.ascontiguousarray(images)


def random_flips(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image mirrored left-right with probability 1/2."""
    flip = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flip] = images[flip, :, ::-1]
    return out


def translate(padded: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Random crops of pre-padded images: a shift of -pad..pad pixels each way, per image.

    One slice per (dy, dx) pair rather than per image: (2 pad + 1)^2 vectorised copies.
    """
    height, width = padded.shape[1] - 2 * pad, padded.shape[2] - 2 * pad
    shifts = rng.integers(0, 2 * pad + 1, (len(padded), 2))
    out = np.empty((len(padded), height, width, padded.shape[3]), padded.dtype)
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            chosen = np.flatnonzero((shifts[:, 0] == dy) & (shifts[:, 1] == dx))
            out[chosen] = padded[chosen, dy : dy + height, dx : dx + width]
    return out


def cut_out(images: np.ndarray, size: int, fill: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Set a random size x size square of each image (inside the image, as airbench96) to `fill`."""
    count, height, width = images.shape[:3]
    top = rng.integers(0, height - size + 1, count)[:, None, None]
    left = rng.integers(0, width - size + 1, count)[:, None, None]
    rows = np.arange(height)[None, :, None]
    cols = np.arange(width)[None, None, :]
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    images = images.copy()
    images[inside] = fill
    return images
