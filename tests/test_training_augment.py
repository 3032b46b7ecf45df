"""Batched augmentation: translations, alternating flips and cutout."""

import numpy as np

from training.augment import EpochAugmenter, cut_out, translate
from training.recipe import Recipe

PLAIN = Recipe(optimizer="adam", epochs=1, batch_size=1, learning_rate=0.1)


def numbered_images(count: int, side: int = 8) -> np.ndarray:
    """Images whose pixels are all different, so any crop or flip can be identified."""
    return np.arange(count * side * side * 3).reshape(count, side, side, 3).astype(np.int64)


def test_translate_gives_each_image_one_in_range_crop_and_uses_every_shift():
    images = numbered_images(400)
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    out = translate(padded, 2, np.random.default_rng(0))
    seen = set()
    for image, source in zip(out, padded, strict=True):
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if (source[dy : dy + 8, dx : dx + 8] == image).all()]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) == 25


def test_alternating_flips_show_each_image_both_ways_in_two_epochs():
    images = numbered_images(50)
    augmenter = EpochAugmenter(images, PLAIN.with_overrides(flip="alternating"), np.random.default_rng(0))
    first, second = augmenter.epoch(0), augmenter.epoch(1)
    np.testing.assert_array_equal(second, first[:, :, ::-1])
    flipped = [(a == b[:, ::-1]).all() for a, b in zip(first, images, strict=True)]
    assert 0 < sum(flipped) < len(images)  # a random half starts mirrored


def test_cutout_sets_one_whole_square_inside_each_image():
    images = np.zeros((100, 16, 16, 3), np.uint8)
    out = cut_out(images, 6, np.array([9, 8, 7], np.uint8), np.random.default_rng(0))
    for image in out:
        rows, cols = np.nonzero((image == [9, 8, 7]).all(axis=2))
        assert len(rows) == 36 and np.ptp(rows) == 5 and np.ptp(cols) == 5
    assert images.max() == 0  # the input is left alone
