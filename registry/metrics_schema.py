"""metrics.json: the one key set train.py writes and the registry stores, and its files.

A model's metrics are a small JSON object. Its calibration's OOD arrays (class means, precision
matrices: megabytes) are not in it: train.py writes them beside it as `calibration.safetensors`
(calibration.split_record), and the registry keeps them as a BLOB.

Keys are those of `KEYS`, documented there; other keys are kept as they are. Files written
before this schema used other names for a few of them (`LEGACY`): `normalise` maps them once,
when a metrics.json is read for an import (and the 0007 migration maps the stored rows), so
nothing else reads the old names. Flask-free: train.py and the registry share it.
"""

from __future__ import annotations

import json
from pathlib import Path

from inference import calibration

CALIBRATION_FILE = "calibration.safetensors"

KEYS = {
    "name": "registry name to import under (optional)",
    "arch": "architecture (training.architectures)",
    "arch_options": "the architecture's own options, e.g. widths",
    "class_names": "class names in output order",
    "input_shape": "height, width, channels",
    "input_scale": "pixel scaling the model expects: unit, raw or symmetric",
    "output_kind": "logits or probabilities",
    "tta": "the predictor's test-time augmentation",
    "test_accuracy": "accuracy on the test split, through the serving predictor",
    "test_accuracy_other_tta": "test accuracy with each other TTA mode",
    "per_class_accuracy": "class name -> test accuracy",
    "confusion_matrix": "rows true class, columns predicted (test split)",
    "best_val_accuracy": "best held-out accuracy over the epochs",
    "final_val_accuracy": "held-out accuracy after the last epoch",
    "final_val_accuracy_tta": "the same through the serving predictor",
    "epochs": "epochs trained",
    "recipe": "every hyper-parameter (training.recipe.Recipe.as_dict): batch_size, learning_rate, ...",
    "random_seed": "seed of the run and of the held-out split",
    "distribute": "tf.distribute strategy",
    "replicas": "replicas the strategy trained on",
    "train_images": "training images",
    "val_images": "held-out images",
    "val_fraction": "held-out share of the training split",
    "test_images": "test images",
    "data_source": "the data set trained on (path or archive)",
    "data_sha256": "its sha256",
    "parameters": "the model's parameter count",
    "train_time_s": "training time",
    "wall_time_s": "the whole run's time",
    "inference": "images/s at batch 64 and ms for one image",
    "inference_other_tta": "the same for each other TTA mode",
    "cpu_count": "CPU cores of the training machine",
    "command": "the command that trained the model",
    "history": "per-epoch loss and accuracy, training and held-out",
    "report_files": "the report folder's files",
    "calibration": "calibration record without its OOD arrays (inference/calibration.py, inference/ood.py)",
    "ood_evaluation": "per-group OOD table (benchmarks/calibration_ood.py --write-metrics)",
    "explain_layer": "layer the saliency maps are drawn from (optional)",
}

# Old top-level names: a renamed key, or a hyper-parameter now inside `recipe`.
LEGACY = {"seed": "random_seed"}
LEGACY_RECIPE = ("batch_size", "learning_rate", "weight_decay", "precision")


def normalise(metrics: dict) -> dict:
    """`metrics` with the old key names mapped to the documented ones (a value given under the
    documented name wins)."""
    metrics = dict(metrics)
    for old, new in LEGACY.items():
        if old in metrics:
            value = metrics.pop(old)
            metrics.setdefault(new, value)
    moved = {key: metrics.pop(key) for key in LEGACY_RECIPE if key in metrics}
    if moved:
        metrics["recipe"] = {**moved, **(metrics.get("recipe") or {})}
    return metrics


def read_metrics(path: Path) -> dict:
    """A metrics.json, normalised, with its calibration whole again (the OOD arrays from
    calibration.safetensors beside it; an old file carries them inline)."""
    metrics = normalise(json.loads(path.read_text()))
    if metrics.get("calibration"):
        sidecar = path.with_name(CALIBRATION_FILE)
        stats = sidecar.read_bytes() if sidecar.is_file() else None
        metrics["calibration"] = calibration.join_record(metrics["calibration"], stats)
    return metrics


def write_metrics(path: Path, metrics: dict) -> None:
    """Write metrics.json (indented, small) and, when the calibration has OOD arrays, them
    beside it as calibration.safetensors."""
    metrics = normalise(metrics)
    if metrics.get("calibration"):
        metrics["calibration"], stats = calibration.split_record(metrics["calibration"])
        if stats is not None:
            path.with_name(CALIBRATION_FILE).write_bytes(stats)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
