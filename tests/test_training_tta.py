"""The predictor's test-time augmentation views (the TTA half of predictor.py)."""

import keras
import numpy as np
import pytest

from predictor import ModelSpec, Predictor, average_views, softmax, tta_views


@pytest.fixture(scope="module")
def position_sensitive_model():
    """A dense model on raw pixels: any flip or shift changes its logits."""
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Flatten(), keras.layers.Dense(4)])


def test_flip_translate_is_airbenchs_six_weighted_views(position_sensitive_model):
    model = position_sensitive_model
    images = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    spec = ModelSpec(("a", "b", "c", "d"), (6, 6, 3), tta="flip-translate")
    got = Predictor(model, spec).predict_arrays(images)

    def f(batch):
        return np.asarray(model(np.ascontiguousarray(batch), training=False), np.float64)

    x = images.astype(np.float32) / 255.0
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    mirror = lambda b: 0.5 * f(b) + 0.5 * f(b[:, :, ::-1])  # noqa: E731 (airbench's infer_mirror)
    shifted = 0.5 * mirror(padded[:, 0:6, 0:6]) + 0.5 * mirror(padded[:, 2:8, 2:8])
    expected = softmax(0.5 * mirror(x) + 0.5 * shifted)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode, views", [("none", 1), ("flip", 2), ("flip-translate", 6)])
def test_views_and_weights_line_up(mode, views):
    batch = np.random.default_rng(1).random((5, 4, 4, 3))
    stacked, weights = tta_views(batch, mode)
    assert stacked.shape == (5 * views, 4, 4, 3) and weights.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(stacked[:5], batch)
    constant = np.repeat(np.arange(5.0)[:, None], 2, axis=1)
    np.testing.assert_allclose(average_views(np.tile(constant, (views, 1)), weights), constant)
