"""Drift monitoring benchmark: false alarms on an unshifted stream and detection delays on shifted
ones, through the app's own recording path.

The shipped model is imported into a fresh registry in a temporary folder. Its drift reference
is fitted (as `flask drift fit-reference` does) on 5,000 CIFAR-10 test images, stratified and
seeded; the other 5,000, shuffled, are the unshifted stream. Shifted streams are made from them
with NumPy/SciPy on the 32 x 32 pixels: Gaussian noise sigma 0.1 (of the 0-1 range), Gaussian
blur sigma 1.5 px, brightness + 0.3; and class-prior shifts, one class (cat) from 10 % to 30 %
and to 20 % (drawn with replacement from the stream's images).

Each stream's images are encoded as PNG (lossless: the model sees the shifted pixels) and go
through the app: the unshifted stream end to end through `POST /api/v1/predict` (Flask's test
client: decoding, model, calibration, the history record and its drift samples), the others
through the same functions in process (serving.decode_uploads, serving.answer,
prediction_history.record), 64 images a call. What the app recorded per prediction (class, top
probability, decision, OOD score, image statistics, PCA coordinates) is read back once per
stream and cached under benchmarks/results/drift_cache/ (keyed by the model's sha256 and the
seed; not committed); the windows are then resampled from those recorded floats and tested with
the app's own window evaluation (monitoring/windows.evaluate):

- false alarms: --null-windows windows of 500 drawn without replacement from the unshifted
  stream's 5,000 predictions; the share with any alert;
- detection: --runs runs per shifted stream, each a fresh random order of its predictions cut
  into windows of 500; the first window with an alert (and with "model") gives the delay in
  requests. The prior shifts draw each window's classes at the shifted priors.

    python benchmarks/drift.py --data ../shared/data/cifar10-jpeg.tar.gz --out benchmarks/results/drift.json

(`--record-only` stops after recording and caching the streams: the two halves each stay within
a few minutes of CPU.)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from devtools.machine import cpu_model
from training.data import DEFAULT_ARCHIVE

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "results" / "drift_cache"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

WINDOW = 500
CALL = 64
PRIOR_CLASS = "cat"
IMAGE_SHIFTS = ("noise", "blur", "brightness")


@dataclass
class Recorded:
    """What the app recorded for each image of a stream, in stream order, and the true labels."""

    rows: list  # monitoring.store.DriftSample, detached
    labels: np.ndarray
    windows: list  # the alerts of each window of 500 the app closed while recording the stream


def read_test_split(archive: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """The CIFAR-10 test images (uint8, 32 x 32) and labels, decoded as the app decodes uploads."""
    from predictor import decode_image
    from registry.model_spec import CIFAR10_CLASSES
    from training.data import _iter_folder_files

    images, labels = [], []
    for split, label, data in _iter_folder_files(archive):
        if split == "test":
            images.append(decode_image(data, (32, 32)))
            labels.append(CIFAR10_CLASSES.index(label))
    return np.stack(images), np.array(labels), CIFAR10_CLASSES


def shifted(images: np.ndarray, shift: str, seed: int) -> np.ndarray:
    """The images with an image shift applied on the 0-1 scale, back to uint8."""
    x = images.astype(np.float64) / 255
    if shift == "noise":
        x = x + np.random.default_rng(seed).normal(0, 0.1, x.shape)
    elif shift == "blur":
        x = ndimage.gaussian_filter(x, sigma=(0, 1.5, 1.5, 0))
    elif shift == "brightness":
        x = x + 0.3
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def through_api(client, images: np.ndarray) -> None:
    """POST the images 64 at a time to the API, as a script would."""
    for start in range(0, len(images), CALL):
        files = [(io.BytesIO(png(p)), f"{start + i}.png") for i, p in enumerate(images[start : start + CALL])]
        response = client.post("/api/v1/predict", data={"image": files}, content_type="multipart/form-data")
        if response.status_code != 200:
            raise SystemExit(f"the API answered {response.status_code}: {response.get_data(as_text=True)[:300]}")


def through_recording_path(app, images: np.ndarray) -> None:
    """Classify and record the images with the functions the API calls, in process."""
    import prediction_history
    import serving
    from web.extensions import model_serving

    budget = serving.DecodeBudget()
    with app.app_context():
        loaded = model_serving.slot()
        for start in range(0, len(images), CALL):
            uploads = [serving.Upload(f"{start + i}.png", png(p)) for i, p in enumerate(images[start : start + CALL])]
            decoded = serving.decode_uploads(uploads, [loaded.input_size], budget)
            answered, _ = serving.answer(decoded, loaded)
            prediction_history.record(answered, loaded, "api", keep_images=False)


def last_sample_id(app) -> int:
    from sqlalchemy import func, select

    from database import db
    from monitoring.store import DriftSample

    with app.app_context():
        return db.session.scalar(select(func.max(DriftSample.id))) or 0


def read_back(app, first_id: int) -> list:
    from sqlalchemy import select

    from database import db
    from monitoring.store import DriftSample

    with app.app_context():
        rows = list(db.session.scalars(select(DriftSample).where(DriftSample.id > first_id).order_by(DriftSample.id)))
        db.session.expunge_all()
    return rows


def closed_windows(app, first_id: int, last_id: int) -> list[list[str]]:
    """The alerts of the count windows the app closed over a stream's predictions, in order."""
    from monitoring import windows

    with app.app_context():
        return [w.alerts for w in windows.windows(kind="count") if first_id <= w.last_sample_id <= last_id]


def cache_path(sha256: str, stream: str, seed: int) -> Path:
    return CACHE / f"{sha256[:16]}-{stream}-seed{seed}.json"


FIELDS = ("id", "class_index", "top_probability", "decision", "ood_score", "brightness_mean", "brightness_std",
          "saturation_mean", "sharpness", "embedding")  # fmt: skip


def save_cache(path: Path, rows: list, labels: np.ndarray, windows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "rows": [{f: getattr(r, f) for f in FIELDS} for r in rows],
        "labels": labels.tolist(),
        "windows": windows,
    }
    path.write_text(json.dumps(data))


def load_cache(path: Path) -> Recorded:
    from types import SimpleNamespace

    data = json.loads(path.read_text())
    return Recorded([SimpleNamespace(**row) for row in data["rows"]], np.array(data["labels"]), data["windows"])


def evaluate(rows: list, reference, seed: int):
    from monitoring import windows

    return windows.evaluate(rows, reference, seed)


def false_alarms(stream: Recorded, reference, count: int, seed: int) -> dict:
    """Windows of WINDOW drawn without replacement from the stream: the share with each alert."""
    rng = np.random.default_rng(seed)
    alerts = {"any": 0, "input": 0, "prediction": 0, "model": 0}
    by_test: dict[str, int] = {}
    for i in range(count):
        picked = rng.choice(len(stream.rows), WINDOW, replace=False)
        report = evaluate([stream.rows[j] for j in picked], reference, seed * 100_000 + i)
        alerts["any"] += bool(report.alerts)
        for alert in report.alerts:
            alerts[alert] += 1
        for test in report.tests:
            by_test[test.name] = by_test.get(test.name, 0) + test.drift
        by_test["accuracy_3se"] = by_test.get("accuracy_3se", 0) + report.accuracy.fell
    return {"windows": count, "rates": {k: v / count for k, v in alerts.items()}, "by_test": by_test}


def prior_order(stream: Recorded, class_index: int, share: float, length: int, rng) -> list[int]:
    """Indexes of `length` predictions whose true classes follow the shifted priors (with replacement)."""
    shifted_class = np.flatnonzero(stream.labels == class_index)
    others = np.flatnonzero(stream.labels != class_index)
    from_class = rng.random(length) < share
    picks = np.where(from_class, rng.choice(shifted_class, length), rng.choice(others, length))
    return picks.tolist()


def detection(stream: Recorded, reference, runs: int, windows: int, seed: int, prior=None) -> dict:
    """Per run, the requests until the first alert and until the first "model" alert (None: not
    within `windows` windows), and each run's first-window estimated accuracy."""
    rng = np.random.default_rng(seed)
    first_alert, first_model, accuracy, alerts_seen = [], [], [], {}
    for run in range(runs):
        if prior is None:
            order = rng.permutation(len(stream.rows))[: windows * WINDOW].tolist()
        else:
            order = prior_order(stream, *prior, windows * WINDOW, rng)
        alert_at = model_at = None
        for w in range(windows):
            report = evaluate([stream.rows[j] for j in order[w * WINDOW : (w + 1) * WINDOW]], reference, run * 10 + w)
            if w == 0:
                accuracy.append(report.accuracy.value)
                for alert in report.alerts:
                    alerts_seen[alert] = alerts_seen.get(alert, 0) + 1
            if report.alerts and alert_at is None:
                alert_at = (w + 1) * WINDOW
            if "model" in report.alerts and model_at is None:
                model_at = (w + 1) * WINDOW
            if alert_at is not None and model_at is not None:
                break
        first_alert.append(alert_at)
        first_model.append(model_at)
    return {
        "runs": runs,
        "detected_within": {f"{(w + 1) * WINDOW}": _share(first_alert, (w + 1) * WINDOW) for w in range(windows)},
        "model_alert_within": {f"{(w + 1) * WINDOW}": _share(first_model, (w + 1) * WINDOW) for w in range(windows)},
        "first_window_alerts": {k: v / runs for k, v in alerts_seen.items()},
        "median_delay": _median(first_alert),
        "estimated_accuracy_first_window": float(np.mean(accuracy)),
    }


def _share(delays: list, within: int) -> float:
    return sum(d is not None and d <= within for d in delays) / len(delays)


def _median(delays: list) -> float | None:
    found = [d for d in delays if d is not None]
    return float(np.median(found)) if len(found) > len(delays) / 2 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "model.h5")
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE, help="CIFAR-10 image-folder archive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--null-windows", type=int, default=1000, help="resampled unshifted windows")
    parser.add_argument("--runs", type=int, default=100, help="runs per shifted stream")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--record-only", action="store_true", help="record and cache the streams, then stop")
    args = parser.parse_args()

    import model_store
    from app import create_app
    from monitoring import store
    from monitoring.reference import Reference
    from registry import metrics_schema
    from serving import spec_of
    from training.calibration_fit import fit_drift_reference
    from training.data import stratified_split
    from web.extensions import model_serving

    started = time.perf_counter()
    cpu_started = time.process_time()
    images, labels, class_names = read_test_split(args.data)
    reference_idx, stream_idx = stratified_split(labels, 0.5, args.seed)
    stream_idx = np.random.default_rng(args.seed).permutation(stream_idx)
    metrics = metrics_schema.read_metrics(args.model.with_name("metrics.json"))
    streams: dict[str, Recorded] = {}
    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(
            {
                "INSTANCE_PATH": scratch,
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{scratch}/bench.sqlite",
                "RATELIMIT_ENABLED": False,
                "KEEP_IMAGES": False,
            }
        )
        with app.app_context():
            model_store.init_db()
            row = model_store.import_model(args.model, metrics=metrics, activate=True)
            # The source file's hash: the registry's re-saved file is not byte-stable across imports.
            sha256, spec = row.metrics["imported_from"]["sha256"], spec_of(row)
            model = model_store.load_keras_model(model_store.served_file(row, app.config["MODEL_CACHE_DIR"]))
            record = model_store.get_full_calibration(row.id)
            # Cached with the streams: their recorded PCA coordinates are in this reference's axes.
            cached_reference = cache_path(sha256, "reference", args.seed).with_suffix(".safetensors")
            if cached_reference.is_file():
                reference = Reference.from_bytes(cached_reference.read_bytes())
            else:
                source = f"benchmarks/drift.py: {len(reference_idx)} CIFAR-10 test images (seed {args.seed})"
                reference = fit_drift_reference(model, spec, record, images[reference_idx], source)
                cached_reference.parent.mkdir(parents=True, exist_ok=True)
                cached_reference.write_bytes(reference.to_bytes())
            store.set_reference(row.id, reference)
        model_serving.refresh(app)
        plan = {
            "unshifted": (images[stream_idx], "api"),
            **{s: (shifted(images[stream_idx], s, args.seed), "record") for s in IMAGE_SHIFTS},
        }
        recorded_s: dict[str, float] = {}
        for name, (pixels, path) in plan.items():
            cached = cache_path(sha256, name, args.seed)
            if cached.is_file():
                streams[name] = load_cache(cached)
                continue
            t0 = time.perf_counter()
            first = last_sample_id(app)
            if path == "api":
                through_api(app.test_client(), pixels)
            else:
                through_recording_path(app, pixels)
            rows = read_back(app, first)
            assert len(rows) == len(pixels), (name, len(rows))
            save_cache(cached, rows, labels[stream_idx], closed_windows(app, rows[0].id, rows[-1].id))
            streams[name] = load_cache(cached)
            recorded_s[name] = round(time.perf_counter() - t0, 1)
            print(
                f"{name}: {len(rows)} predictions recorded through the {path} path in {recorded_s[name]} s", flush=True
            )
    if args.record_only:
        print(f"recorded in {time.perf_counter() - started:.0f} s wall, {time.process_time() - cpu_started:.0f} s CPU")
        return 0
    prior_class = class_names.index(PRIOR_CLASS)
    results = {
        "cpu": cpu_model(),
        "seed": args.seed,
        "window": WINDOW,
        "reference": reference.summary(),
        "recorded_seconds": recorded_s,
        "recorded_windows_alerts": {name: s.windows for name, s in streams.items()},
        "accuracy_true": {
            name: float(np.mean([r.class_index == y for r, y in zip(s.rows, s.labels, strict=True)]))
            for name, s in streams.items()
        },
        "false_alarms": false_alarms(streams["unshifted"], reference, args.null_windows, args.seed),
    }
    print(json.dumps(results["false_alarms"]), flush=True)
    for name in IMAGE_SHIFTS:
        results[name] = detection(streams[name], reference, args.runs, 2, args.seed)
        print(name, json.dumps(results[name]), flush=True)
    for share in (0.3, 0.2):
        name = f"prior_{PRIOR_CLASS}_{round(share * 100)}"
        results[name] = detection(streams["unshifted"], reference, args.runs, 2, args.seed, (prior_class, share))
        print(name, json.dumps(results[name]), flush=True)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    results["cpu_s"] = round(time.process_time() - cpu_started, 1)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    print(f"done in {results['wall_s']} s wall, {results['cpu_s']} s CPU ({results['cpu']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
