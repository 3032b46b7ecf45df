"""Architectures (the table, whitening, dirac filters) and airbench's Lookahead."""

import keras
import numpy as np
import pytest

from training.architectures import ARCHITECTURES, CIFAR_MEAN, CIFAR_STD, build_model, whitening_weights
from training.lookahead import Lookahead


def test_seed_network_is_the_seed_documents():
    model = build_model("seed", (32, 32, 3), 10)
    assert model.count_params() == 1_504_266
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Dropout") == 4 and kinds.count("Dense") == 3 and kinds.count("Conv2D") == 3
    assert ARCHITECTURES["seed"].recipe.batch_size == 32 and ARCHITECTURES["seed"].recipe.epochs == 50


def test_whitening_decorrelates_normalised_patches():
    rng = np.random.default_rng(0)
    base = rng.normal(128, 40, (600, 8, 8, 1))
    images = np.clip(base + rng.normal(0, 10, (600, 8, 8, 3)), 0, 255).astype(np.uint8)  # correlated channels
    kernel, bias = whitening_weights(images, eps=1e-6)
    x = images.astype(np.float32) / 255.0
    windows = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    out = windows.reshape(-1, 12) @ kernel.reshape(12, 24) + bias
    # On the normalised pixels airbench's filters give an identity second moment (first 12 outputs).
    second_moment = out[:, :12].T @ out[:, :12] / len(out)
    np.testing.assert_allclose(second_moment, np.eye(12), atol=0.05)
    # The bias folds in the normalisation: a pixel at the mean colour gives zero.
    mean_patch = np.tile(CIFAR_MEAN, 4).reshape(1, 12)
    np.testing.assert_allclose(mean_patch @ kernel.reshape(12, 24) + bias, 0, atol=1e-4)
    assert CIFAR_STD.shape == (3,)


def test_strong_net_starts_with_dirac_filters():
    model = build_model("strong", (32, 32, 3), 10, np.zeros((10, 32, 32, 3), np.uint8) + 100)
    kernel = model.get_layer("conv1a").kernel.numpy()  # 24 in, 64 out
    np.testing.assert_array_equal(kernel[1, 1, :, :24], np.eye(24))
    assert np.abs(kernel[:, :, :, :24]).sum() == 24 and np.abs(kernel[:, :, :, 24:]).max() <= 1 / np.sqrt(216)
    assert model.get_layer("bn1a").momentum == 0.6


def test_strong_model_saves_as_plain_layers_that_load_in_safe_mode(tmp_path):
    model = build_model("strong", (32, 32, 3), 10, np.full((4, 32, 32, 3), 90, np.uint8))
    path = tmp_path / "model.h5"
    model.save(path, include_optimizer=False)
    loaded = keras.saving.load_model(path, compile=False, safe_mode=True)
    images = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(images, training=False), model(images, training=False), rtol=1e-5)


def bn_model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.BatchNormalization()])
    model.build((None, 3))
    return model


def test_lookahead_averages_every_5_steps_including_batchnorm_statistics():
    model = bn_model()
    lookahead = Lookahead(model, total_steps=10)
    start = [v.numpy().copy() for v in lookahead.variables]
    assert any("moving_mean" in v.path for v in lookahead.variables)
    for variable in lookahead.variables:
        variable.assign(variable.numpy() + 1.0)
    lookahead.after_step(4)  # not a multiple of 5: nothing happens
    np.testing.assert_allclose(lookahead.variables[0].numpy(), start[0] + 1.0)
    lookahead.after_step(5)
    decay = 0.95**5 * 0.5**3
    for variable, before in zip(lookahead.variables, start, strict=True):
        np.testing.assert_allclose(variable.numpy(), before + (1 - decay), rtol=1e-6)


def test_lookahead_finish_returns_to_the_slow_weights():
    model = bn_model()
    lookahead = Lookahead(model, total_steps=10)
    slow = [v.numpy().copy() for v in lookahead.variables]
    for variable in lookahead.variables:
        variable.assign(variable.numpy() - 3.0)
    lookahead.finish()
    for variable, expected in zip(lookahead.variables, slow, strict=True):
        np.testing.assert_array_equal(variable.numpy(), expected)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_table_entry_builds_and_names_a_known_tta(arch):
    from predictor import TTA_MODES

    model = build_model(arch, (32, 32, 3), 4, np.zeros((4, 32, 32, 3), np.uint8))
    assert model.output_shape == (None, 4) and ARCHITECTURES[arch].recipe.tta in TTA_MODES
