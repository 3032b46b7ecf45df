"""The training loop: a recipe's optimiser, augmentation and Lookahead around `train_on_batch`.

A loop of our own rather than `model.fit`, because airbench's Lookahead writes averaged weights
(BatchNorm statistics included) back into the model every 5 steps, which `fit` does not allow
under every backend; `train_on_batch` reads the model's variables afresh on each call.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import keras
import numpy as np

from training.augment import EpochAugmenter
from training.data import ImageSplits
from training.lookahead import Lookahead
from training.optim import make_optimizer
from training.recipe import Recipe


def compile_for(model: keras.Model, recipe: Recipe, steps_per_epoch: int) -> keras.losses.Loss:
    """Attach the recipe's optimiser and loss (cross-entropy from logits, one-hot labels)."""
    loss = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=recipe.label_smoothing)
    model.compile(optimizer=make_optimizer(recipe, steps_per_epoch), loss=loss, jit_compile=recipe.jit_compile)
    return loss


def logits_of(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The model's float64 logits for uint8 images (scaled to [0, 1] as the serving does)."""
    return model.predict(images.astype(np.float32) / 255.0, batch_size=1000, verbose=0).astype(np.float64)


def train_model(
    model: keras.Model,
    splits: ImageSplits,
    recipe: Recipe,
    random_seed: int,
    validate: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, list[float]]:
    """Train in place; returns the history (loss per epoch, and validation loss and accuracy)."""
    num_classes = len(splits.class_names)
    steps = len(splits.x_train) // recipe.batch_size
    if steps == 0:
        raise SystemExit(f"error: {len(splits.x_train)} training images do not fill a batch of {recipe.batch_size}")
    loss_fn = compile_for(model, recipe, steps)
    rng = np.random.default_rng(random_seed)
    augmenter = EpochAugmenter(splits.x_train, recipe, rng)
    lookahead = Lookahead(model, steps * recipe.epochs) if recipe.lookahead else None
    one_hot = np.eye(num_classes, dtype=np.float32)
    history: dict[str, list[float]] = {"loss": []}
    started = time.monotonic()
    for epoch in range(recipe.epochs):
        images = augmenter.epoch(epoch)
        order = rng.permutation(len(images))
        losses = []
        for step in range(steps):
            index = order[step * recipe.batch_size : (step + 1) * recipe.batch_size]
            x = images[index].astype(np.float32) / 255.0
            losses.append(float(model.train_on_batch(x, one_hot[splits.y_train[index]])))
            if lookahead:
                lookahead.after_step(epoch * steps + step + 1)
        if lookahead and epoch == recipe.epochs - 1:
            lookahead.finish()
        history["loss"].append(float(np.mean(losses)))
        if validate and len(splits.x_val):
            logits = logits_of(model, splits.x_val)
            history.setdefault("val_loss", []).append(float(loss_fn(one_hot[splits.y_val], logits)))
            history.setdefault("val_accuracy", []).append(float((logits.argmax(1) == splits.y_val).mean()))
        if log:
            log(_progress(epoch, recipe.epochs, time.monotonic() - started, history))
    return history


def _progress(epoch: int, epochs: int, elapsed: float, history: dict) -> str:
    """One line an epoch: loss, validation accuracy, elapsed and estimated remaining time."""
    remaining = elapsed / (epoch + 1) * (epochs - epoch - 1)
    text = f"epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f}"
    if "val_accuracy" in history:
        text += f", val_accuracy {history['val_accuracy'][-1]:.4f}"
    return text + f", elapsed {elapsed / 60:.1f} min, about {remaining / 60:.1f} min left"
