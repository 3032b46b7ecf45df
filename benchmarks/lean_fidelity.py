"""Does the lean engine answer as the TensorFlow path does on real images (issue 21's fp32 target)?

The shipped model is converted as an import converts it (`model_sandbox.convert_for_engine`'s
layers, checked on the probe batch), then the CIFAR-10 test split (`--limit` images of it, in the
archive's order) is scored twice through the serving `Predictor`, with the model's calibration:
once with TensorFlow's tf.function, once with the LiteEngine. Reported: the largest logit and
OOD-score differences, the share of images given the same top class and the same decision
(confident, unsure, unknown), and both accuracies.

    PYTHONPATH=. python benchmarks/lean_fidelity.py [--model models/default/model.h5]
        [--data ../shared/data/cifar10-jpeg.tar.gz] [--limit 10000] [--out benchmarks/results/lean_fidelity.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from devtools.machine import cpu_model  # noqa: E402


def test_images(archive: Path, class_names: tuple[str, ...], limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `limit` test/<class>/ images of an image-folder archive, decoded as serving decodes them."""
    from predictor import decode_image

    images, labels = [], []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "test" and parts[-2] in class_names:
                images.append(decode_image(tar.extractfile(member).read(), (32, 32)))
                labels.append(class_names.index(parts[-2]))
                if len(images) == limit:
                    break
    return np.stack(images), np.asarray(labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/default/model.h5")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lean_fidelity.json")
    args = parser.parse_args()

    import keras

    from inference import lite_engine
    from inference.calibration import Calibration
    from model_sandbox import convert_for_engine
    from predictor import Predictor, to_predictions
    from registry import metrics_schema
    from registry.model_spec import ModelSpec

    metrics = metrics_schema.read_metrics(args.model.with_name("metrics.json"))
    model = keras.saving.load_model(args.model, compile=False, safe_mode=True)
    spec = ModelSpec.from_metrics(metrics, list(model.input_shape[1:]))
    calibration = Calibration.from_record(metrics.get("calibration"))
    engine_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"lean-fidelity-{os.getpid()}.tflite"
    options = {"feature_layers": list(calibration.feature_layers), "explain_layer": metrics.get("explain_layer")}
    metadata = convert_for_engine(model, args.model.name, engine_file, options)
    engine = lite_engine.LiteEngine(engine_file.read_bytes(), metadata, num_threads=1)
    engine_file.unlink()
    predictors = {
        "tensorflow": Predictor(model, spec, calibration),
        "litert": Predictor(None, spec, calibration, forward=engine.forward(calibration.feature_layers)),
    }
    images, labels = test_images(args.data, spec.class_names, args.limit)
    answers = {}
    for name, predictor in predictors.items():
        started = time.perf_counter()
        logits, features, predictions = [], [], []
        for start in range(0, len(images), 250):
            chunk = images[start : start + 250]
            chunk_logits, chunk_features = predictor.infer(chunk)
            logits.append(chunk_logits)
            features.append(calibration.ood_scores(chunk_logits, chunk_features))
            predictions += to_predictions(spec.class_names, predictor.score_arrays(chunk), calibration)
        answers[name] = {
            "logits": np.concatenate(logits),
            "ood": np.concatenate(features) if features[0] is not None else None,
            "top": np.array([spec.class_names.index(p.top_class) for p in predictions]),
            "decisions": [p.decision for p in predictions],
            "seconds": time.perf_counter() - started,
        }
    tf, lite = answers["tensorflow"], answers["litert"]
    results = {
        "command": "python benchmarks/lean_fidelity.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_model(),
        "images": len(images),
        "max_abs_logit_diff": float(np.abs(tf["logits"] - lite["logits"]).max()),
        "max_abs_ood_score_diff": None if tf["ood"] is None else float(np.abs(tf["ood"] - lite["ood"]).max()),
        "same_top_class": float((tf["top"] == lite["top"]).mean()),
        "same_decision": float(np.mean([a == b for a, b in zip(tf["decisions"], lite["decisions"], strict=True)])),
        "accuracy_tensorflow": float((tf["top"] == labels).mean()),
        "accuracy_litert": float((lite["top"] == labels).mean()),
        "seconds": {name: round(answer["seconds"], 1) for name, answer in answers.items()},
    }
    print(json.dumps(results, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
