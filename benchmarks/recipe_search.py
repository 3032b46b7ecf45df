"""Hyper-parameter search for train.py's strong recipe, on the validation split only.

Trains variants of the strong architecture (train.py's own model, optimizer and schedule code)
on the training images minus the stratified validation split, and reports validation accuracy
with and without flip test-time augmentation. The test split is never evaluated.

Keras runs on any backend here, so the search can use a GPU machine with JAX
(`KERAS_BACKEND=jax`); augmentation (reflect-padded random crop, horizontal flip) is the same as
train.py's tf.data pipeline, done in NumPy.

    KERAS_BACKEND=jax python benchmarks/recipe_search.py --data ../shared/data/cifar10-jpeg.tar.gz \
        --variant base --variant wd=5e-3 --variant wd=5e-3,epochs=36
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import keras
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train

BASE = {**train.ARCH_DEFAULTS["strong"], "padding": 4, "widths": train.STRONG_WIDTHS, "cutout": 0, "ema": 0.0}


def parse_variant(text: str) -> dict:
    """'wd=5e-3,epochs=36' -> the base settings with those changed ('base' changes nothing)."""
    keys = {"wd": "weight_decay", "lr": "learning_rate", "epochs": "epochs", "batch": "batch_size", "pad": "padding"}
    keys.update(cutout="cutout", ema="ema")
    settings = dict(BASE)
    for item in filter(None, text.split(",")):
        if item == "base":
            continue
        key, value = item.split("=")
        if key == "widths":
            settings["widths"] = tuple(int(w) for w in value.split("-"))
        elif key == "precision":
            settings["precision"] = value
        else:
            settings[keys[key]] = type(BASE[keys[key]])(float(value))
    return settings


def batches(images: np.ndarray, labels: np.ndarray, num_classes: int, batch: int, padding: int, cutout: int, rng):
    """Endless shuffled batches with random reflect-padded crops, flips and cutout, one-hot labels."""
    height, width = images.shape[1:3]
    eye = np.eye(num_classes, dtype=np.float32)
    while True:
        order = rng.permutation(len(images))
        for start in range(0, len(order) - batch + 1, batch):
            index = order[start : start + batch]
            padded = np.pad(images[index], ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode="reflect")
            windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(1, 2))
            dy = rng.integers(0, 2 * padding + 1, batch)
            dx = rng.integers(0, 2 * padding + 1, batch)
            crops = windows[np.arange(batch), dy, dx].transpose(0, 2, 3, 1)
            flip = rng.random(batch) < 0.5
            crops[flip] = crops[flip, :, ::-1]
            crops = crops.astype(np.float32) / 255.0
            if cutout:
                rows = np.arange(height)[None, :, None]
                cols = np.arange(width)[None, None, :]
                cy = rng.integers(0, height, batch)[:, None, None]
                cx = rng.integers(0, width, batch)[:, None, None]
                inside = (np.abs(rows - cy) * 2 < cutout) & (np.abs(cols - cx) * 2 < cutout)
                crops[inside] = 0.5
            yield crops, eye[labels[index]]


def run(settings: dict, data: train.Dataset, seed: int) -> dict:
    keras.utils.set_random_seed(seed)
    keras.mixed_precision.set_global_policy(settings["precision"])
    num_classes = len(data.class_names)
    steps = len(data.x_train) // settings["batch_size"]
    model = train.build_model("strong", data.x_train.shape[1:], num_classes, data.x_train, settings["widths"])
    train.compile_model(model, "strong", settings, steps)
    rng = np.random.default_rng(seed)
    stream = batches(
        data.x_train, data.y_train, num_classes, settings["batch_size"], settings["padding"], settings["cutout"], rng
    )
    started = time.perf_counter()
    model.fit(stream, steps_per_epoch=steps, epochs=settings["epochs"], verbose=0)
    seconds = time.perf_counter() - started
    images = data.x_val.astype(np.float32) / 255.0
    logits = model.predict(images, batch_size=1000, verbose=0).astype(np.float64)
    flipped = model.predict(images[:, :, ::-1], batch_size=1000, verbose=0).astype(np.float64)
    return {
        **settings,
        "val_accuracy": float((logits.argmax(1) == data.y_val).mean()),
        "val_accuracy_flip_tta": float(((logits + flipped).argmax(1) == data.y_val).mean()),
        "train_seconds": round(seconds, 1),
        "backend": keras.backend.backend(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(train.DEFAULT_ARCHIVE))
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="e.g. base, wd=5e-3, epochs=36,pad=2, widths=96-384-384, precision=float32",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append one JSON line per variant here")
    args = parser.parse_args()
    data = train.load_dataset(args.data, 32, 0.1, args.seed)
    for text in args.variant or ["base"]:
        result = {"variant": text, **run(parse_variant(text), data, args.seed)}
        line = json.dumps(result)
        print(line, flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
