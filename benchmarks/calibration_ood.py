"""Calibration and "none of these" benchmark, through the app's own API.

Imports a model into a fresh registry in a temporary folder, calibrates it as `flask calibrate`
does (unless its metrics.json already carries a calibration from train.py), then classifies, as
encoded image files posted 64 at a time to `POST /api/v1/predict` of the real app (Flask's test
client: decoding, TTA, calibrated probabilities, OOD score, decision, exactly as the API answers),
the CIFAR-10 test split and an evaluation set of images that are none of the classes, built only
from what ships inside packages or is generated here:

- photos: the sample photos of scikit-learn, scikit-image and matplotlib (people, buildings,
  flowers, coffee, coins, the moon, a page of text, textures, microscopy, a galaxy field), whole
  and as seeded random crops; pictures of a cat, a horse, a rocket or a motorcycle are left out;
- faces: scikit-image's LFW subset (25x25 grey faces, upscaled);
- digits: scikit-learn's 8x8 digits, upscaled;
- text: words rendered with Pillow's default font on random colours;
- noise: uniform and smoothed random pixels;
- flat colours.

Prints a markdown table: ECE before/after and coverage at 98/99 % accuracy on the test split,
then AUROC and the share of each group accepted (FPR) at the score that keeps 95 % of the test
images (TPR 95 %), for the app's OOD score and for the top probability as a baseline, and the
share the app's own threshold calls "unknown".

Needs the sample data packages, kept out of the app's requirements:
    .venv/bin/pip install scikit-learn==1.6.1 scikit-image==0.26.0
    python benchmarks/calibration_ood.py --model models/default/model.h5 \
        --data ../shared/data/cifar10-jpeg.tar.gz --val-fraction 0.1 --seed 0
(`--val-fraction 0.1 --seed 0` is the old recipe's validation split; a model trained with a
calibration split records its calibration in metrics.json, and the options are then unused.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from devtools.machine import cpu_model
from training.data import DEFAULT_ARCHIVE

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CROPS_PER_PHOTO = 8
SKIMAGE_PHOTOS = (
    "astronaut", "camera", "coffee", "coins", "moon", "page", "brick", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "retina", "cell", "clock", "microaneurysms", "text",
)  # fmt: skip
WORDS = ("hello", "invoice", "total 42", "Flask", "keras", "EXIT", "menu", "1998", "note", "café", "stop", "abc")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def as_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 RGB from the grey, float or RGBA arrays the sample data sets use."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.clip(array / max(float(array.max()), 1e-9) * 255, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return array[..., :3]


def sample_photos() -> dict[str, np.ndarray]:
    """Whole sample photos that are none of CIFAR-10's classes."""
    import matplotlib.cbook
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: as_rgb(getattr(skimage.data, name)()) for name in SKIMAGE_PHOTOS}
    for name, image in zip(("china", "flower"), load_sample_images().images, strict=True):
        photos[name] = as_rgb(image)
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos["grace_hopper"] = np.asarray(Image.open(handle).convert("RGB"))
    return photos


def crops(photo: np.ndarray, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Square crops of 25 to 60 % of the shorter side, at random places."""
    height, width = photo.shape[:2]
    out = []
    for _ in range(count):
        side = int(min(height, width) * rng.uniform(0.25, 0.6))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        out.append(photo[top : top + side, left : left + side])
    return out


def rendered_text(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    font = ImageFont.load_default(size=18)
    images = []
    for _ in range(count):
        background, ink = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        image = Image.new("RGB", (64, 64), tuple(int(v) for v in background))
        draw = ImageDraw.Draw(image)
        for line in range(3):
            word = WORDS[rng.integers(len(WORDS))]
            draw.text((2, 2 + line * 20), word, fill=tuple(int(v) for v in ink), font=font)
        images.append(np.asarray(image))
    return images


def noise(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    images = []
    for i in range(count):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        if i % 2:  # smoothed: blobs rather than static
            small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            pixels = np.asarray(Image.fromarray(small).resize((32, 32), Image.Resampling.BICUBIC))
        images.append(pixels)
    return images


def ood_groups(seed: int = 0) -> dict[str, list[bytes]]:
    """The evaluation set, by group, as PNG files."""
    import skimage.data
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    photos = sample_photos()
    cropped = [crop for photo in photos.values() for crop in crops(photo, CROPS_PER_PHOTO, rng)]
    faces = skimage.data.lfw_subset()[:100]
    digits = load_digits().images[:300]
    upscale = lambda array, side: np.asarray(Image.fromarray(as_rgb(array)).resize((side, side)))  # noqa: E731
    flats = [np.full((32, 32, 3), rng.integers(0, 256, 3), np.uint8) for _ in range(100)]
    groups = {
        "photos, whole": list(photos.values()),
        "photos, crops": cropped,
        "faces (LFW)": [upscale(face, 32) for face in faces],
        "digits 8x8 upscaled": [upscale(digit, 32) for digit in digits],
        "rendered text": rendered_text(200, rng),
        "noise": noise(200, rng),
        "flat colours": flats,
    }
    return {name: [png(image) for image in images] for name, images in groups.items()}


def cifar_test(archive: Path, limit: int | None) -> tuple[list[bytes], list[str]]:
    """The test split's JPEG files and class names, straight from the archive."""
    files, labels = [], []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "test":
                files.append(tar.extractfile(member).read())
                labels.append(parts[-2])
    order = np.random.default_rng(0).permutation(len(files))[:limit]
    return [files[i] for i in order], [labels[i] for i in order]


def auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(outlier score > inlier score), ties half: the Mann-Whitney form of the ROC area."""
    scores = np.concatenate([inliers, outliers])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    n_in, n_out = len(inliers), len(outliers)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def accepted_at_95(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """Share of outliers scored at or below the score that keeps 95 % of the inliers."""
    return float((outliers <= np.quantile(inliers, 0.95)).mean())


def serve(client, uploads_bytes: list[bytes], batch: int = 64) -> list[dict]:
    """The API's predictions for encoded images, `batch` files a request."""
    predictions = []
    for start in range(0, len(uploads_bytes), batch):
        files = [(io.BytesIO(data), f"{i}.img") for i, data in enumerate(uploads_bytes[start : start + batch], start)]
        response = client.post("/api/v1/predict", data={"image": files}, content_type="multipart/form-data")
        if response.status_code != 200:
            raise SystemExit(f"the API answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
        predictions += response.get_json()["predictions"]
    return predictions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "model.h5")
    parser.add_argument("--metrics", type=Path, help="metrics.json (default: beside the model)")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 image-folder archive")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of train/ (if calibrating)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split (if calibrating)")
    parser.add_argument("--recalibrate", action="store_true", help="calibrate even if metrics.json has one")
    parser.add_argument("--test-images", type=int, help="use only this many test images (default: all)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument(
        "--save-calibration", type=Path, help="write the whole calibration record here (for `serve.py --calibration`)"
    )
    parser.add_argument(
        "--write-metrics",
        action="store_true",
        help="store the calibration and the per-group OOD table in the metrics.json (the model card shows both)",
    )
    args = parser.parse_args()

    import model_store
    from app import create_app
    from inference import calibration as cal
    from registry import metrics_schema
    from serving import spec_of
    from training.calibration_fit import calibrate_folder

    metrics_path = args.metrics or args.model.with_name("metrics.json")
    metrics = metrics_schema.read_metrics(metrics_path) if metrics_path.is_file() else {}
    if args.recalibrate:
        metrics.pop("calibration", None)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(
            {
                "INSTANCE_PATH": scratch,
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{scratch}/bench.sqlite",
                "RATELIMIT_ENABLED": False,  # 10,000 images from one address
                "RECORD_HISTORY": False,
            }
        )
        with app.app_context():
            model_store.init_db()
            row = model_store.import_model(args.model, metrics=metrics, activate=True)
            record = model_store.get_full_calibration(row.id)
            if record is None:
                model = model_store.load_keras_model(model_store.served_file(row, scratch))
                record = calibrate_folder(model, spec_of(row), args.data, args.val_fraction, args.seed)
                model_store.set_calibration(row.id, record)
            calibrated_s = time.perf_counter() - started
            if args.save_calibration:
                args.save_calibration.write_text(json.dumps(record))
            class_names = list(row.class_names)
        client = app.test_client()
        files, labels = cifar_test(args.data, args.test_images)
        test = serve(client, files)
        groups = {name: serve(client, images) for name, images in ood_groups().items()}

    class_index = {name: i for i, name in enumerate(class_names)}
    y = np.array([class_index[label] for label in labels])
    probabilities = np.array([[p["probabilities"][name] for name in class_names] for p in test])
    correct = probabilities.argmax(axis=1) == y
    confidence = probabilities.max(axis=1)
    ood_in = np.array([p["ood_score"] for p in test], dtype=float)
    served = {
        "ece_after": cal.expected_calibration_error(probabilities, y),
        "coverage_at_98": cal.coverage_at_accuracy(confidence, correct, 0.98),
        "coverage_at_99": cal.coverage_at_accuracy(confidence, correct, 0.99),
        "accuracy": float(correct.mean()),
        "decisions": {d: sum(p["decision"] == d for p in test) / len(test) for d in cal.DECISIONS},
    }
    rows = []
    for name, predictions in groups.items():
        ood_out = np.array([p["ood_score"] for p in predictions], dtype=float)
        msp_out = -np.array([p["probability"] for p in predictions])
        rows.append(
            {
                "group": name,
                "images": len(predictions),
                "auroc_ood": auroc(ood_in, ood_out),
                "accepted_ood": accepted_at_95(ood_in, ood_out),
                "auroc_top_probability": auroc(-confidence, msp_out),
                "accepted_top_probability": accepted_at_95(-confidence, msp_out),
                "unknown_share": sum(p["decision"] == "unknown" for p in predictions) / len(predictions),
            }
        )
    report(args, record, served, rows, len(test), time.perf_counter() - started, calibrated_s)
    if args.out:
        args.out.write_text(json.dumps({"calibration": cal.summary(record), "served": served, "ood": rows}, indent=2))
    if args.write_metrics:
        command = "python benchmarks/calibration_ood.py " + " ".join(sys.argv[1:])
        evaluation = {"command": command, "test_images": len(test), "groups": rows}
        metrics.update(calibration=record, ood_evaluation=evaluation)
        metrics_schema.write_metrics(metrics_path, metrics)
    return 0


def report(args, record: dict, served: dict, rows: list[dict], test_images: int, total_s: float, cal_s: float) -> None:
    before, after = record["before"], record["after"]
    print(f"model {args.model} · {test_images} CIFAR-10 test images · {cpu_model()}, {os.cpu_count()} cores")
    print(f"calibration: {record.get('source')}; {total_s:.0f} s in all ({cal_s:.0f} s to calibrate)\n")
    print("| measure (CIFAR-10 test) | before | after |\n| --- | --- | --- |")
    print(f"| ECE, 15 bins | {before['ece']:.4f} | {after['ece']:.4f} (served: {served['ece_after']:.4f}) |")
    for level in ("98", "99"):
        print(
            f"| coverage at {level} % accuracy | {before['coverage_at_' + level] * 100:.1f} % "
            f"| {after['coverage_at_' + level] * 100:.1f} % (served: {served['coverage_at_' + level] * 100:.1f} %) |"
        )
    print(f"| accuracy (served) | | {served['accuracy'] * 100:.2f} % |")
    print(
        f"\ntemperature {record['temperature']:.4g}, logit normalisation {record['logit_norm']} "
        f"(AURC on held-out: {', '.join(f'{k} {v:.4f}' for k, v in record['aurc_by_logit_norm'].items())}); "
        f"'not sure' below {record['confidence_threshold'] * 100:.1f} % "
        f"(test: {after['threshold_coverage'] * 100:.1f} % answered with confidence, "
        f"{(after['threshold_accuracy'] or 0) * 100:.2f} % of them right)"
    )
    shares = ", ".join(f"{d} {share * 100:.1f} %" for d, share in served["decisions"].items())
    print(f"served decisions on the test images: {shares}\n")
    print(
        "| group | images | AUROC, OOD score | accepted at 95 % TPR, OOD score "
        "| AUROC, top probability | accepted at 95 % TPR, top probability | called unknown by the app |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['group']} | {row['images']} | {row['auroc_ood']:.3f} | {row['accepted_ood'] * 100:.1f} % "
            f"| {row['auroc_top_probability']:.3f} | {row['accepted_top_probability'] * 100:.1f} % "
            f"| {row['unknown_share'] * 100:.1f} % |"
        )


if __name__ == "__main__":
    sys.exit(main())
