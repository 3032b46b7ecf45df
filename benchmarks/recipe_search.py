"""Recipe search for train.py's strong architecture, on the validation split only.

Each variant is train.py's own recipe (training/recipe.py) with some fields changed, trained with
the shipped code (architecture, optimiser, Lookahead, augmentation, loop) on the training images
minus a stratified 10 % validation split, for several random seeds; validation accuracy is
reported without TTA, with flips and with flips and translations. The test split is never used.

Keras runs on any backend, so the search can use a GPU machine with JAX. The images are decoded
once, then `--workers` processes share the GPU, each taking every n-th run.

    KERAS_BACKEND=jax python benchmarks/recipe_search.py --seeds 0,1,2 --workers 4 \
        --variant full --variant "no-lookahead:lookahead=0" --out results.jsonl

A variant is `name:field=value,...` over Recipe fields and the architecture options
(bn_momentum, dirac, widths=64-256-256); `jpeg=50` re-encodes the images at that JPEG quality.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from predictor import TTA_MODES, average_views, tta_views
from training.data import DEFAULT_ARCHIVE, read_image_folder, split_arrays
from training.recipe import AIRBENCH94

RECIPE_TYPES = {field.name: type(getattr(AIRBENCH94, field.name)) for field in fields(AIRBENCH94)}
ARCH_OPTIONS = {
    "bn_momentum": float,
    "dirac": lambda v: bool(int(v)),
    "widths": lambda v: tuple(map(int, v.split("-"))),
}


def parse_variant(text: str) -> tuple[str, dict, dict, int]:
    """'name:epochs=24,bn_momentum=0.4' -> (name, recipe overrides, architecture options, jpeg)."""
    name, _, body = text.partition(":")
    overrides, options, jpeg = {}, {}, 0
    for item in filter(None, body.split(",")):
        key, value = item.split("=")
        if key == "jpeg":
            jpeg = int(value)
        elif key in ARCH_OPTIONS:
            options[key] = ARCH_OPTIONS[key](value)
        elif RECIPE_TYPES[key] is bool:
            overrides[key] = bool(int(value))
        else:
            overrides[key] = RECIPE_TYPES[key](value)
    return name, overrides, options, jpeg


def recompress(images: np.ndarray, quality: int) -> np.ndarray:
    """The images re-encoded as JPEG at a quality (4:2:0, as the archive), decoded again."""
    from PIL import Image

    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))
    return out


def run(cache: dict, variant: str, random_seed: int) -> dict:
    """Train one variant with one seed; validation accuracy under each TTA mode."""
    import keras

    from training.architectures import build_model
    from training.loop import logits_of, train_model

    name, overrides, options, jpeg = parse_variant(variant)
    recipe = AIRBENCH94.with_overrides(**overrides)
    splits = split_arrays(
        tuple(cache["class_names"]),
        {"train": (cache["x_train"], cache["y_train"]), "test": (cache["x_test"], cache["y_test"])},
        0.1,
        random_seed,
        "search",
        "",
    )
    if jpeg:
        splits.x_train, splits.x_val = recompress(splits.x_train, jpeg), recompress(splits.x_val, jpeg)
    keras.utils.set_random_seed(random_seed)
    keras.mixed_precision.set_global_policy(recipe.precision)
    model = build_model(
        "strong", splits.x_train.shape[1:], len(splits.class_names), splits.x_train, random_seed, **options
    )
    started = time.perf_counter()
    train_model(model, splits, recipe, random_seed, validate=False, log=None)
    seconds = time.perf_counter() - started
    accuracy = {}
    for mode in TTA_MODES:
        views, weights = tta_views(splits.x_val, mode)
        logits = average_views(logits_of(model, views), weights)
        accuracy[f"val_accuracy_{mode}"] = float((logits.argmax(1) == splits.y_val).mean())
    return {
        "variant": name,
        "spec": variant,
        "random_seed": random_seed,
        **accuracy,
        "train_seconds": round(seconds, 1),
        "recipe": recipe.as_dict(),
        "arch_options": {key: list(v) if isinstance(v, tuple) else v for key, v in options.items()},
        "jpeg_recompressed": jpeg or None,
        "train_images": len(splits.x_train),
        "val_images": len(splits.x_val),
        "backend": keras.backend.backend(),
    }


def worker(args) -> None:
    """Run every n-th job of the variant x seed grid (seed-major, so early lines cover all variants)."""
    cache = dict(np.load(args.cache))
    jobs = [(variant, seed) for seed in args.seeds for variant in args.variant]
    index, count = map(int, args.worker.split("/"))
    for variant, seed in jobs[index::count]:
        line = json.dumps(run(cache, variant, seed))
        print(line, flush=True)
        with args.out.open("a") as handle:
            handle.write(line + "\n")


def launch(args) -> None:
    """Decode the data once, then start the workers on it and wait for them."""
    class_names, splits = read_image_folder(Path(args.data), 32)
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "data.npz"
        np.savez(
            cache,
            class_names=np.array(class_names),
            x_train=splits["train"][0],
            y_train=splits["train"][1],
            x_test=splits["test"][0],
            y_test=splits["test"][1],
        )
        base = [sys.executable, __file__, "--cache", str(cache), "--out", str(args.out), "--seeds"]
        base += [",".join(map(str, args.seeds))] + [f"--variant={v}" for v in args.variant]
        env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / args.workers:.2f}")
        procs = [subprocess.Popen([*base, "--worker", f"{i}/{args.workers}"], env=env) for i in range(args.workers)]
        # A time limit stops the launcher: take the workers with it (their finished lines are kept).
        signal.signal(signal.SIGTERM, lambda *_: [proc.terminate() for proc in procs])
        for proc in procs:
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_ARCHIVE))
    parser.add_argument("--variant", action="append", default=[], help="name:field=value,... (see above)")
    parser.add_argument("--seeds", type=lambda v: [int(s) for s in v.split(",")], default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the device")
    parser.add_argument("--out", type=Path, required=True, help="append one JSON line per run here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.variant = args.variant or ["full"]
    worker(args) if args.worker else launch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
