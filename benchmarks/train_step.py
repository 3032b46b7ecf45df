"""Seconds per training step of the strong recipe on this machine, in float32 or bfloat16,
with or without XLA.

Decides whether a recipe fits the hour on a given CPU before spending the hour: builds the
strong architecture (whitening from random images), compiles it with the shipped recipe's
optimiser, and times `train_on_batch` on one batch after two warm-up steps.

    python benchmarks/train_step.py [--precision float32|mixed_bfloat16] [--jit-compile] [--steps 3]
        [--batch-size 1024] [--widths 64,256,256]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from training.architectures import STRONG_WIDTHS, build_model, parse_widths
from training.loop import compile_for
from training.recipe import STRONG


def seconds_per_step(precision: str, jit_compile: bool, steps: int, batch_size: int, widths: tuple[int, ...]) -> float:
    """Mean wall time of one training step of `batch_size` random images."""
    keras.mixed_precision.set_global_policy(precision)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5000, 32, 32, 3), dtype=np.uint8)
    model = build_model("strong", (32, 32, 3), 10, images, widths=widths)
    compile_for(model, STRONG.with_overrides(jit_compile=jit_compile, batch_size=batch_size), steps_per_epoch=48)
    x = images[:batch_size].astype(np.float32) / 255.0
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch_size)]
    for _ in range(2):
        model.train_on_batch(x, y)
    started = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--jit-compile", action="store_true", help="XLA-compile the step (train.py --jit-compile)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=STRONG.batch_size)
    parser.add_argument("--widths", type=parse_widths, default=STRONG_WIDTHS, help="channels of the 3 groups")
    args = parser.parse_args()
    seconds = seconds_per_step(args.precision, args.jit_compile, args.steps, args.batch_size, args.widths)
    steps_per_epoch = 48_000 // args.batch_size
    widths = ",".join(map(str, args.widths))
    print(
        f"{args.precision}{' XLA' if args.jit_compile else ''}, widths {widths}: {seconds:.2f} s per step of "
        f"{args.batch_size} images ({seconds / args.batch_size * 1000:.2f} ms an image); "
        f"{seconds * steps_per_epoch / 60:.1f} min per epoch of 48,000 images"
    )


if __name__ == "__main__":
    main()
