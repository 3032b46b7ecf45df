"""Dynamic-range int8 against fp32, each with its own calibration (issue 21, item 5).

The shipped model is converted twice as an import converts it (`model_sandbox.convert_for_engine`,
fp32 and `--engine int8`), and each conversion is calibrated on its own outputs as `flask
calibrate` does (`training.calibration_fit.calibrate_model` with the engine): temperature and
"not sure" threshold on the old recipe's held-out split (train/ with `--val-fraction 0.1 --seed
0`: 5,000 images the model was not trained on), OOD class means and precision on `--fit-images`
of the other training images. Then both score `--limit` seeded test images and the "none of these"
images of benchmarks/calibration_ood.py (needs scikit-learn and scikit-image, as that script
says). Reported per engine: accuracy, ECE before and after calibration, coverage at 98 % accuracy,
OOD AUROC (all groups pooled, and per group) and the share of OOD images the app calls "unknown";
int8 also with fp32's calibration, which serving refuses, to show what the refit is for; and how
often int8 agrees with fp32 on the top class and the decision.

    .venv/bin/pip install scikit-learn==1.6.1 scikit-image==0.26.0
    PYTHONPATH=. python benchmarks/int8_fidelity.py [--model models/default/model.h5]
        [--data ../shared/data/cifar10-jpeg.tar.gz] [--limit 5000] [--fit-images 5000]
        [--out benchmarks/results/int8_fidelity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from devtools.machine import cpu_model  # noqa: E402


def convert(model, filename: str, options: dict, quantize: bool):
    """The model's conversion as an import makes it, loaded in a LiteEngine."""
    from inference.lite_engine import LiteEngine
    from model_sandbox import convert_for_engine

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "model.tflite"
        metadata = convert_for_engine(model, filename, path, {**options, "quantize": quantize})
        return LiteEngine(path.read_bytes(), metadata, num_threads=1), path.stat().st_size


def outputs(engine, spec, layers, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and pooled features as served (test-time views averaged)."""
    from predictor import Predictor
    from training.calibration_fit import model_outputs

    return model_outputs(Predictor(None, spec, feature_layers=layers, forward=engine.forward(layers)), images)


def measure(calibration, answers: dict, labels: np.ndarray, groups: dict[str, slice]) -> dict:
    """Accuracy, ECE, coverage and OOD figures of one engine's outputs under one calibration."""
    from benchmarks.calibration_ood import auroc
    from inference import calibration as cal
    from predictor import softmax

    logits, features = answers["test"]
    probabilities = calibration.probabilities(logits)
    correct = probabilities.argmax(axis=1) == labels
    ood_in = calibration.ood_scores(logits, features)
    ood_out = calibration.ood_scores(*answers["ood"])
    decisions = [calibration.decide(p, s) for p, s in zip(probabilities.max(axis=1), ood_in, strict=True)]
    return {
        "accuracy": float(correct.mean()),
        "ece_uncalibrated": cal.expected_calibration_error(softmax(logits), labels),
        "ece": cal.expected_calibration_error(probabilities, labels),
        "coverage_at_98": cal.coverage_at_accuracy(probabilities.max(axis=1), correct, 0.98),
        "ood_auroc": auroc(ood_in, ood_out),
        "ood_auroc_by_group": {name: auroc(ood_in, ood_out[where]) for name, where in groups.items()},
        "ood_called_unknown": float((ood_out > calibration.ood.threshold).mean()),
        "test_called_unknown": float((ood_in > calibration.ood.threshold).mean()),
        "decisions": decisions,
    }


def ood_images() -> tuple[np.ndarray, dict[str, slice]]:
    """calibration_ood's evaluation set decoded as serving decodes it, and where each group lies."""
    from benchmarks.calibration_ood import ood_groups
    from predictor import decode_image

    images, groups = [], {}
    for name, files in ood_groups().items():
        groups[name] = slice(len(images), len(images) + len(files))
        images += [decode_image(data, (32, 32)) for data in files]
    return np.stack(images), groups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/default/model.h5")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--limit", type=int, default=5_000, help="test images (seeded sample)")
    parser.add_argument("--fit-images", type=int, default=5_000, help="training images the OOD Gaussians are fitted on")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/int8_fidelity.json")
    args = parser.parse_args()
    started = time.perf_counter()

    import keras

    from inference.calibration import Calibration
    from registry import metrics_schema
    from registry.model_spec import ModelSpec
    from training.calibration_fit import calibrate_model, folder_splits

    metrics = metrics_schema.read_metrics(args.model.with_name("metrics.json"))
    model = keras.saving.load_model(args.model, compile=False, safe_mode=True)
    spec = ModelSpec.from_metrics(metrics, list(model.input_shape[1:]))
    layers = Calibration.from_record(metrics.get("calibration")).feature_layers
    options = {"feature_layers": list(layers), "explain_layer": metrics.get("explain_layer")}
    splits = folder_splits(spec, args.data, 0.1, 0)
    keep = np.sort(np.random.default_rng(0).permutation(len(splits.test_images))[: args.limit])
    test_images, test_labels = splits.test_images[keep], splits.test_labels[keep]
    ood, groups = ood_images()

    results, answers, records = {}, {}, {}
    for name, quantize in (("fp32", False), ("int8", True)):
        begun = time.perf_counter()
        engine, size = convert(model, args.model.name, options, quantize)
        records[name] = calibrate_model(
            model,
            spec,
            splits.fit_images,
            splits.fit_labels,
            splits.heldout_images,
            splits.heldout_labels,
            layers=layers,
            max_fit_images=args.fit_images,
            source="benchmarks/int8_fidelity.py",
            engine=engine,
        )
        answers[name] = {"test": outputs(engine, spec, layers, test_images), "ood": outputs(engine, spec, layers, ood)}
        results[name] = measure(Calibration.from_record(records[name]), answers[name], test_labels, groups)
        results[name].update(
            file_bytes=size,
            probe_top1_agreement=engine.metadata.get("probe_top1_agreement"),
            seconds=round(time.perf_counter() - begun, 1),
        )
    # What serving refuses: int8 outputs with fp32's calibration.
    results["int8 with fp32's calibration"] = measure(
        Calibration.from_record(records["fp32"]), answers["int8"], test_labels, groups
    )
    fp32_top = answers["fp32"]["test"][0].argmax(axis=1)
    int8_top = answers["int8"]["test"][0].argmax(axis=1)
    decisions = {name: result.pop("decisions") for name, result in results.items()}
    summary = {
        "command": "python benchmarks/int8_fidelity.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "test_images": len(test_images),
        "ood_images": len(ood),
        "heldout_images": len(splits.heldout_images),
        "fit_images": min(args.fit_images, len(splits.fit_images)),
        "int8_same_top_class_as_fp32": float((fp32_top == int8_top).mean()),
        "int8_same_decision_as_fp32": float(
            np.mean([a == b for a, b in zip(decisions["fp32"], decisions["int8"], strict=True)])
        ),
        "max_abs_logit_diff": float(np.abs(answers["fp32"]["test"][0] - answers["int8"]["test"][0]).max()),
        "temperature": {name: records[name]["temperature"] for name in records},
        "engines": results,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
