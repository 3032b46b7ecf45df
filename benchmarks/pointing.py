"""Pointing benchmark for the Grad-CAM maps: does the heat map's peak fall where the object is?

CIFAR-10 test images are pasted, each into one quadrant (chosen at random) of a mid-grey canvas
twice their side; the canvas goes through the app's own path (PNG upload -> decode -> model input
-> Grad-CAM of the image's true class -> the map drawn over the canvas), and the benchmark counts
how often the brightest pixel of the drawn map lies in the quadrant that holds the image. Chance
is 25 %; the target for the shipped model is 80 %.

    python benchmarks/pointing.py --model models/default/model.h5 [--per-class 100] [--layer NAME]
        [--data ARCHIVE] [--out benchmarks/results/pointing.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import DEFAULT_ARCHIVE

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MID_GREY = (128, 128, 128)


def split_images(archive: Path, split: str, per_class: int) -> list[tuple[str, bytes]]:
    """The first `per_class` images of each class of `split` (by file name): (class, JPEG bytes)."""
    chosen: dict[str, list[tuple[str, bytes]]] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == split:
                chosen.setdefault(parts[-2], []).append((parts[-1], tar.extractfile(member).read()))
    return [(label, data) for label in sorted(chosen) for _, data in sorted(chosen[label])[:per_class]]


def on_canvas(data: bytes, quadrant: int) -> bytes:
    """The image pasted into quadrant 0-3 (row-major) of a mid-grey canvas twice its side, as PNG."""
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGB")
    canvas = Image.new("RGB", (image.width * 2, image.height * 2), MID_GREY)
    canvas.paste(image, ((quadrant % 2) * image.width, (quadrant // 2) * image.height))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG")
    return buffer.getvalue()


def peak_quadrant(drawn: np.ndarray) -> int:
    """The quadrant (0-3, row-major) of the brightest pixel of a heat map drawn at canvas size."""
    row, col = np.unravel_index(np.argmax(drawn), drawn.shape)
    return int(row >= drawn.shape[0] / 2) * 2 + int(col >= drawn.shape[1] / 2)


def drawn_map(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The map as the overlay draws it: bilinear, at the canvas size (the canvas is square, so the
    model saw all of it)."""
    return np.asarray(Image.fromarray(grid.astype(np.float32), "F").resize(size, Image.Resampling.BILINEAR))


def main() -> int:
    from inference.explain import WEIGHTINGS, Explainer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a .h5/.keras model (metrics.json beside it is read)")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--layer", help="explain this layer instead of the one found (or named in metrics.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("test", "train"), default="test", help="train: for choosing a method")
    parser.add_argument("--weighting", choices=WEIGHTINGS, help="the Explainer's (default: its own)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pointing.json")
    args = parser.parse_args()

    import model_store
    from predictor import Predictor, decode_upload
    from registry.model_spec import ModelSpec

    sidecar = args.model.with_name("metrics.json")
    metrics = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    model = model_store.load_keras_model(args.model, allow_hdf5=True)  # the operator's own file
    spec = ModelSpec.from_metrics(metrics, model.input_shape[1:])
    options = {"weighting": args.weighting} if args.weighting else {}
    explainer = Explainer(model, spec, args.layer or metrics.get("explain_layer"), **options)
    predictor = Predictor(model, spec)

    samples = split_images(args.data, args.split, args.per_class)
    quadrants = np.random.default_rng(args.seed).integers(0, 4, len(samples))
    canvases = [on_canvas(data, int(q)) for (_, data), q in zip(samples, quadrants, strict=True)]
    pixels = np.stack([decode_upload(canvas, spec.image_size)[0] for canvas in canvases])
    labels = [spec.class_names.index(label) for label, _ in samples]
    with Image.open(io.BytesIO(canvases[0])) as first:
        canvas_size = first.size

    started = time.perf_counter()
    grids = np.concatenate(
        [explainer.explain(pixels[i : i + 64], labels[i : i + 64]) for i in range(0, len(labels), 64)]
    )
    explain_s = time.perf_counter() - started
    peaks = np.array([peak_quadrant(drawn_map(grid, canvas_size)) for grid in grids])
    hits = peaks == quadrants
    predicted = predictor.predict_arrays(pixels).argmax(axis=1)
    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}",
        "model": str(args.model),
        "layer": explainer.layer_name,
        "weighting": explainer.weighting,
        "split": args.split,
        "grid": list(explainer.grid_shape),
        "images": len(samples),
        "canvas": list(canvas_size),
        "pointing_accuracy": round(float(hits.mean()), 4),
        "pointing_accuracy_when_classified_right": round(float(hits[predicted == labels].mean()), 4),
        "classified_right_on_canvas": round(float((predicted == labels).mean()), 4),
        "explain_ms_per_image": round(1000 * explain_s / len(samples), 3),
    }
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
