"""The architectures train.py can build, in one table: name -> builder and default recipe.

Every model is plain Keras layers (safe-mode loadable). Initial values that Keras initializers
cannot express (airbench's dirac filters, the whitening convolution) are assigned as arrays after
building, so no custom initializer class reaches the saved config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers

from training.recipe import ADAM_SEED, STRONG, Recipe

# airbench94's per-channel CIFAR-10 statistics: the whitening is computed on images normalised
# with them, so its epsilon means what it means there.
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616], np.float32)
STRONG_WIDTHS = (64, 256, 256)


def parse_widths(text: str) -> tuple[int, ...]:
    """The strong network's group widths from the command line ("32,128,256"): three positive
    whole numbers, else an error argparse shows as the option's message."""
    parts = text.split(",")
    if len(parts) != len(STRONG_WIDTHS) or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected three positive whole numbers such as 32,128,256, not {text!r}")
    return tuple(int(part) for part in parts)


def build_seed(input_shape: tuple[int, int, int], num_classes: int, **_) -> keras.Model:
    """The seed document's CNN (section 1.3), layer for layer: 1,504,266 parameters for CIFAR-10."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Dropout(0.25),
            layers.Conv2D(64, (3, 3), padding="same", activation="relu"),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(512, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(512, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(num_classes),
        ],
        name="seed_cnn",
    )


def whitening_weights(images: np.ndarray, eps: float = 5e-4) -> tuple[np.ndarray, np.ndarray]:
    """Kernel and bias of airbench94's 2x2 patch-whitening convolution, for [0, 1] input.

    As airbench: eigenvectors of the (uncentred) patch second moment of the first 5,000 images,
    normalised by the CIFAR mean and std, scaled by 1/sqrt(eigenvalue + eps), and their negatives.
    The normalisation is folded into the kernel and bias so the model takes the serving's [0, 1]
    pixels; airbench's own bias starts at zero.
    """
    sample = (images[:5000].astype(np.float32) / 255.0 - CIFAR_MEAN) / CIFAR_STD
    windows = np.lib.stride_tricks.sliding_window_view(sample, (2, 2), axis=(1, 2))
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12).astype(np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(patches.T @ patches / len(patches))
    filters = eigenvectors.T / np.sqrt(eigenvalues + eps)[:, None]
    filters = np.concatenate([filters, -filters]).reshape(24, 2, 2, 3)  # (out, kh, kw, in)
    kernel = filters / CIFAR_STD  # x_norm = (x - mean) / std: divide by std per input channel
    bias = -(kernel * CIFAR_MEAN).sum(axis=(1, 2, 3))
    return kernel.transpose(1, 2, 3, 0).astype(np.float32), bias.astype(np.float32)


def torch_style_kernel(shape: tuple[int, ...], rng: np.random.Generator, dirac: bool) -> np.ndarray:
    """PyTorch's default uniform(+-1/sqrt(fan_in)) kernel; with `dirac`, airbench's identity
    filters in the first min(in, out) outputs (a 3x3 conv that passes its input through)."""
    fan_in = int(np.prod(shape[:-1]))
    kernel = rng.uniform(-1, 1, shape).astype(np.float32) / np.sqrt(fan_in)
    if dirac and len(shape) == 4:
        kh, kw, channels_in, channels_out = shape
        identity = np.arange(min(channels_in, channels_out))
        kernel[:, :, :, identity] = 0.0
        kernel[kh // 2, kw // 2, identity, identity] = 1.0
    return kernel


def build_strong(
    input_shape: tuple[int, int, int],
    num_classes: int,
    train_images: np.ndarray | None = None,
    widths: tuple[int, ...] = STRONG_WIDTHS,
    bn_momentum: float = 0.6,
    dirac: bool = True,
    random_seed: int = 0,
) -> keras.Model:
    """airbench94's network: patch whitening, three conv-pool-BN-GELU groups, max pool, linear/9.

    `bn_momentum` is Keras' (weight of the old moving statistics); airbench's BatchNorm(momentum=
    0.6) passes 1 - 0.6 to PyTorch, whose momentum is the weight of the new batch: the same 0.6.
    """

    def conv_group(x, width: int, index: int):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{index}a")(x)
        x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
        x = layers.BatchNormalization(scale=False, momentum=bn_momentum, epsilon=1e-12, name=f"bn{index}a")(x)
        x = layers.Activation("gelu", name=f"gelu{index}a")(x)
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{index}b")(x)
        x = layers.BatchNormalization(scale=False, momentum=bn_momentum, epsilon=1e-12, name=f"bn{index}b")(x)
        return layers.Activation("gelu", name=f"gelu{index}b")(x)

    inputs = keras.Input(shape=input_shape)
    # The optimiser keeps the kernel fixed (airbench) and trains the bias for the first epochs only;
    # marking a variable non-trainable would reorder the layer's weights in the .h5 file.
    x = layers.Conv2D(24, 2, padding="valid", name="whiten")(inputs)
    x = layers.Activation("gelu", name="gelu0")(x)
    for index, width in enumerate(widths, start=1):
        x = conv_group(x, width, index)
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Dense(num_classes, use_bias=False, dtype="float32", name="logits")(x)
    outputs = layers.Rescaling(1 / 9, dtype="float32", name="temperature")(x)
    model = keras.Model(inputs, outputs, name="strong_cnn")
    rng = np.random.default_rng(random_seed)
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D | layers.Dense) and layer.name != "whiten":
            layer.kernel.assign(torch_style_kernel(tuple(layer.kernel.shape), rng, dirac))
    if train_images is not None:
        model.get_layer("whiten").set_weights(list(whitening_weights(train_images)))
    return model


@dataclass(frozen=True)
class Architecture:
    """A builder (input shape, classes, **options) -> Keras model, and its default recipe."""

    build: Callable[..., keras.Model]
    recipe: Recipe
    needs_images: bool  # the builder computes weights from training images


ARCHITECTURES = {
    "seed": Architecture(build_seed, ADAM_SEED, needs_images=False),
    "strong": Architecture(build_strong, STRONG, needs_images=True),
}


def build_model(
    arch: str, input_shape, num_classes: int, train_images=None, random_seed: int = 0, **options
) -> keras.Model:
    """Build an architecture from the table by name."""
    spec = ARCHITECTURES[arch]
    extra = {"train_images": train_images, "random_seed": random_seed} if spec.needs_images else {}
    return spec.build(tuple(input_shape), num_classes, **extra, **options)
