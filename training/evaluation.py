"""Evaluation through the serving code path: accuracy, per-class figures, confusion matrix,
inference cost, and the report files (JSON and PNG) written beside a model.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import reports
from predictor import ModelSpec, Predictor


def predict_labels(predictor: Predictor, images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """The predictor's top class for each uint8 image, in chunks (its TTA multiplies the batch)."""
    if not len(images):
        return np.zeros(0, np.int64)
    return np.concatenate(
        [predictor.predict_arrays(images[i : i + chunk]).argmax(axis=1) for i in range(0, len(images), chunk)]
    )


def evaluate_predictor(predictor: Predictor, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class, columns: predicted)."""
    names = predictor.spec.class_names
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (labels, predict_labels(predictor, images)), 1)
    totals = confusion.sum(axis=1)
    per_class = {name: (float(confusion[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(names)}
    return {
        "accuracy": float(np.trace(confusion) / max(1, len(labels))),
        "images": len(labels),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def accuracy_by_tta(model, spec: ModelSpec, images: np.ndarray, labels: np.ndarray, modes) -> dict[str, float]:
    """Accuracy of the same model served with each of the given TTA modes."""
    return {
        mode: float((predict_labels(Predictor(model, replace(spec, tta=mode)), images) == labels).mean())
        for mode in modes
    }


def measure_inference(predictor: Predictor, batch: int = 64, repeats: int = 50) -> dict:
    """Median ms for one image and images/s in batches of 64, through the serving code path."""
    height, width, channels = predictor.spec.input_shape
    images = np.random.default_rng(0).integers(0, 256, (batch, height, width, channels), dtype=np.uint8)
    predictor.predict_arrays(images)
    single = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.predict_arrays(images[:1])
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeats // 2):
        predictor.predict_arrays(images)
    batch_rate = batch * (repeats // 2) / (time.perf_counter() - start)
    return {
        "tta": predictor.spec.tta,
        "images_per_s_batch64": round(batch_rate, 1),
        "ms_one_image_p50": round(float(np.median(single)) * 1000, 2),
    }


def print_evaluation(evaluation: dict, class_names) -> None:
    """Overall and per-class accuracy and the confusion matrix, as text."""
    print(f"accuracy: {evaluation['accuracy'] * 100:.2f} % on {evaluation['images']} images")
    for name, accuracy in evaluation["per_class_accuracy"].items():
        print(f"  {name:>12}: {'-' if accuracy is None else f'{accuracy * 100:.1f} %'}")
    width = max(6, *(len(n) for n in class_names))
    print("confusion matrix (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{n[:6]:>7}" for n in class_names))
    for name, row in zip(class_names, evaluation["confusion_matrix"], strict=True):
        print(f"{name:>{width}}" + "".join(f"{v:>7}" for v in row))


def write_report(out_dir: Path, evaluation: dict, class_names, history: dict | None) -> dict[str, str]:
    """Write report.json and PNG plots (curves when a history is given; confusion matrix)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"report": "report.json", "confusion_plot": "confusion.png"}
    (out_dir / "report.json").write_text(json.dumps({"test": evaluation, "history": history}, indent=2))
    matrix_png = reports.confusion_png(evaluation["confusion_matrix"], list(class_names), evaluation["accuracy"])
    (out_dir / "confusion.png").write_bytes(matrix_png)
    if history:
        files["curves_plot"] = "curves.png"
        (out_dir / "curves.png").write_bytes(reports.curves_png(history))
    return files
