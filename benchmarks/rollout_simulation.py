"""Champion-and-challenger simulation on the shipped model: detection delay, false rollbacks, and
the confident-conflict limit measured between two good versions.

The shipped model (models/default) is imported into a scratch registry as the app imports it,
loaded as a worker loads it (serving.load_version) and scores the CIFAR-10 test split once
through LoadedModel.predict: calibrated probabilities, decisions and OOD scores per image. A
second good version is the same weights served without test-time augmentation (a different
model of the same quality: no retrained one ships, and training is not run here), with a
calibration of its own fitted as `flask calibrate` fits one. The outputs
are cached (--cache, an .npz under benchmarks/results/ that is not committed) and replayed through
rollout_simulation.simulate, which judges with the app's own rollout_checks code:

- identical: the champion's outputs again (the same weights imported again);
- no-TTA, own calibration: the second good version (what a real retrain would meet);
- no-TTA under the TTA calibration: a broken deployment (its OOD statistics do not fit it);
- swapped: the champion with cat and dog outputs swapped (class distribution unchanged);
- 20 % cat: the champion answering "cat" for a fixed fifth of the images.

    python benchmarks/rollout_simulation.py --seeds 20   # prints markdown, writes benchmarks/results/rollout.json
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
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from devtools.machine import cpu_model  # noqa: E402
from rollout.checks import Action, Criteria  # noqa: E402
from rollout.simulation import Outputs, answering, conflict_rate, simulate, swapped  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_CACHE = ROOT / "benchmarks" / "results" / "rollout_outputs.npz"


def cifar_test(archive: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test split as a uint8 array N x 32 x 32 x 3 and its class names, in archive order."""
    images, labels = [], []
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "test":
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")))
                labels.append(parts[-2])
    return np.stack(images), np.array(labels)


# The versions scored: the shipped model as served (TTA, its own calibration); the same weights
# without TTA under that calibration (a broken deployment: the OOD statistics were fitted on TTA
# outputs); and without TTA with a calibration of its own, fitted as `flask calibrate` fits one
# on the training run's held-out split (the second good version).
# Last, a real retrain, though a weaker one: the seed recipe's model (models/seed, 73 % accuracy),
# calibrated the same way, for the confident-conflict rate of two independently trained models.
VERSIONS = {"tta": (None, False), "notta": ("none", False), "notta_cal": ("none", True), "seed_cal": (None, True)}
SEED_MODEL = ROOT / "models" / "seed" / "model.h5"


def compute_outputs(model: Path, data: Path, wanted: list[str]) -> dict[str, np.ndarray]:
    """The `wanted` versions' answers to every test image, scored as a worker scores them."""
    import model_store
    from app import create_app
    from registry import metrics_schema
    from serving import load_version, spec_of
    from training.calibration_fit import calibrate_folder

    images, labels = cifar_test(data)
    metrics = metrics_schema.read_metrics(model.with_name("metrics.json"))
    arrays: dict[str, np.ndarray] = {"labels": labels}
    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(
            {
                "INSTANCE_PATH": scratch,
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{scratch}/bench.sqlite",
                "MODEL_IMPORT_SANDBOX": False,
            }
        )
        with app.app_context():
            model_store.init_db()
            for name in wanted:
                tta, recalibrate = VERSIONS[name]
                path = SEED_MODEL if name == "seed_cal" else model
                settings = (
                    metrics_schema.read_metrics(path.with_name("metrics.json")) if name == "seed_cal" else metrics
                )
                row = model_store.import_model(path, name=f"default-{name}", metrics=dict(settings), tta=tta)
                if recalibrate:
                    keras_model = model_store.load_keras_model(model_store.served_file(row, Path(scratch) / "models"))
                    model_store.set_calibration(row.id, calibrate_folder(keras_model, spec_of(row), data, 0.1, 0))
                loaded = load_version(row, Path(scratch) / "models")
                started = time.perf_counter()
                predictions = [p for i in range(0, len(images), 250) for p in loaded.predict(images[i : i + 250])]
                print(f"{name}: {len(images)} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
                arrays[f"{name}_classes"] = np.array([p.top_class for p in predictions])
                arrays[f"{name}_decisions"] = np.array([p.decision for p in predictions])
                arrays[f"{name}_top"] = np.array([p.top_probability for p in predictions])
                arrays[f"{name}_ood"] = np.array([p.ood_score for p in predictions], dtype=float)
                loaded.close()
    return arrays


def cached_outputs(cache: Path, model: Path, data: Path) -> dict[str, np.ndarray]:
    """Every version's outputs, computing (and adding to the cache) only those not there yet."""
    arrays = dict(np.load(cache)) if cache.is_file() else {}
    missing = [name for name in VERSIONS if f"{name}_classes" not in arrays]
    if missing:
        arrays.update(compute_outputs(model, data, missing))
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, **arrays)
    return arrays


def outputs(arrays, name: str) -> Outputs:
    return Outputs(
        arrays[f"{name}_classes"],
        arrays[f"{name}_decisions"],
        arrays[f"{name}_top"],
        arrays[f"{name}_ood"],
        arrays["labels"],
    )


def scenario(champion, challenger, seeds: int, horizon: int, criteria: Criteria, **options) -> dict:
    runs = [
        simulate(champion, challenger, seed, criteria=criteria, horizon=horizon, **options) for seed in range(seeds)
    ]
    delays = sorted(run.challenger_requests for run in runs if run.action is Action.ROLLBACK)
    checks: dict[str, int] = {}
    for run in runs:
        for failed in run.failed_checks:
            for name in failed:
                checks[name] = checks.get(name, 0) + 1
    return {
        "seeds": seeds,
        "horizon": horizon,
        "rolled_back": len(delays),
        "promoted": sum(run.action is Action.PROMOTE for run in runs),
        "delays": delays,
        "final_shares": [run.shares[-1] for run in runs],
        "failed_check_counts": checks,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "model.h5")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="model outputs, computed once")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--detect-horizon", type=int, default=300, help="challenger requests for a bad challenger")
    parser.add_argument("--good-horizon", type=int, default=1000, help="challenger requests for a good challenger")
    parser.add_argument("--share", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollout.json")
    args = parser.parse_args()

    arrays = cached_outputs(args.cache, args.model, args.data)
    versions = {name: outputs(arrays, name) for name in VERSIONS}
    champion, second = versions["tta"], versions["notta_cal"]
    criteria = Criteria()
    started = time.perf_counter()
    challengers = {
        "identical": (champion, args.good_horizon),
        "no-TTA, own calibration (second good version)": (second, args.good_horizon),
        "no-TTA under the TTA calibration": (versions["notta"], args.detect_horizon),
        "swapped cat/dog": (swapped(champion, "cat", "dog"), args.detect_horizon),
        "20 % cat": (answering(champion, "cat", 0.2), args.detect_horizon),
        "seed recipe (73 %), own calibration": (versions["seed_cal"], args.detect_horizon),
    }
    results = {}
    for name, (challenger, horizon) in challengers.items():
        results[name] = scenario(champion, challenger, args.seeds, horizon, criteria, share=args.share)
        results[f"{name}, auto-step"] = scenario(
            champion, challenger, args.seeds, horizon, criteria, share=args.share, auto_step=True
        )
    record = {
        "cpu": cpu_model(),
        "criteria": criteria.to_dict(),
        "versions": {
            name: {
                "accuracy": float(np.mean(version.classes == version.labels)),
                "confident": float(np.mean(version.decisions == "confident")),
                "unknown": float(np.mean(version.decisions == "unknown")),
                "confident_conflicts_with_champion": conflict_rate(champion, version),
            }
            for name, version in {**versions, **{key: value[0] for key, value in challengers.items()}}.items()
        },
        "scenarios": results,
        "simulation_s": time.perf_counter() - started,
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(report(record))
    return 0


def report(record: dict) -> str:
    lines = [
        f"CPU: {record['cpu']}; simulation {record['simulation_s']:.0f} s (loaded machine).",
        "",
        "| version | accuracy | confident | unknown | confident conflicts with the champion |",
        "|---|---|---|---|---|",
    ]
    for name, version in record["versions"].items():
        lines.append(
            f"| {name} | {version['accuracy']:.2%} | {version['confident']:.1%} | {version['unknown']:.2%} | "
            f"{version['confident_conflicts_with_champion']:.3%} |"
        )
    lines += [
        "",
        "| challenger | seeds | horizon | rolled back | delay (challenger requests) median / max | failed checks |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in record["scenarios"].items():
        delays = result["delays"]
        delay = f"{int(np.median(delays))} / {max(delays)}" if delays else "-"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(result["failed_check_counts"].items())) or "none"
        lines.append(
            f"| {name} | {result['seeds']} | {result['horizon']} | {result['rolled_back']}/{result['seeds']} | "
            f"{delay} | {counts} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
