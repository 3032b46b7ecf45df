"""Train and evaluate the CIFAR-10 classifier (or one on your own image folders): command line.

    python train.py [--arch strong|seed] [--data PATH] [--epochs N] [--out DIR] [--import]
    python train.py evaluate MODEL [--data PATH] [--out DIR]

The work is in the `training` package (data, architectures and recipes, optimiser, augmentation,
loop, evaluation); this file parses the command line and runs it. A stratified part of the
training images (4 %) is held out: it gives the validation curve here and is kept for calibrating
the model later; the test split is used once, for the reported figure. Writes the model (.h5,
float32, no optimiser state), a metrics JSON (registry/metrics_schema.py: its keys, and the calibration's
OOD arrays beside it in calibration.safetensors) and a report (JSON, curves and confusion matrix PNG).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import keras

from monitoring.reference import REFERENCE_FILE, Reference
from predictor import TTA_MODES, Predictor
from registry import metrics_schema
from registry.model_spec import ModelSpec
from training import calibration_fit
from training.architectures import ARCHITECTURES, build_model, parse_widths
from training.data import ImageSplits, load_splits
from training.evaluation import (
    accuracy_by_tta,
    evaluate_predictor,
    measure_inference,
    print_evaluation,
    write_report,
)
from training.loop import train_model
from training.recipe import Recipe

RECIPE_FLAGS = (
    "epochs",
    "batch_size",
    "learning_rate",
    "weight_decay",
    "translate",
    "cutout",
    "precision",
    "jit_compile",
)


def make_strategy(name: str, logical_cpus: int):
    """The tf.distribute strategy for a flag value; the batch size given to it is global."""
    import tensorflow as tf

    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def to_float32(model: keras.Model, arch: str, num_classes: int, **options) -> keras.Model:
    """A float32 copy of a model trained under mixed precision, for saving and serving."""
    policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        clone = build_model(arch, model.input_shape[1:], num_classes, **options)
        clone.set_weights(model.get_weights())
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return clone


def train(args) -> dict:
    """Train, save the model, its metrics and report; returns the metrics."""
    previous_policy = keras.mixed_precision.global_policy()
    try:
        return _train(args)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train(args) -> dict:
    started = time.monotonic()
    keras.utils.set_random_seed(args.random_seed)
    recipe = ARCHITECTURES[args.arch].recipe.with_overrides(**{flag: getattr(args, flag) for flag in RECIPE_FLAGS})
    strategy = make_strategy(args.distribute, args.logical_cpus)
    keras.mixed_precision.set_global_policy(recipe.precision)
    splits = load_splits(args.data, args.image_size, args.val_fraction, args.random_seed)
    num_classes = len(splits.class_names)
    print(
        f"data: {splits.source}: {len(splits.x_train)} train, {len(splits.x_val)} held out, "
        f"{len(splits.x_test)} test images, {num_classes} classes; {strategy.num_replicas_in_sync} replica(s)",
        flush=True,
    )
    with strategy.scope():
        model = build_model(
            args.arch, splits.x_train.shape[1:], num_classes, splits.x_train, args.random_seed, **arch_options(args)
        )
        log = (lambda line: print(line, flush=True)) if args.verbose else None
        history = train_model(model, splits, recipe, args.random_seed, log=log)
    train_seconds = time.monotonic() - started
    model = to_float32(model, args.arch, num_classes, **arch_options(args))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.h5"
    model.save(model_path, include_optimizer=False)
    spec = ModelSpec(splits.class_names, tuple(splits.x_train.shape[1:]), tta=recipe.tta)
    metrics = _metrics(args, recipe, splits, model, spec, history, train_seconds)
    if len(splits.x_val):
        # Temperature, "not sure" threshold and OOD statistics from the held-out split only;
        # `flask models import` stores them with the model.
        metrics["calibration"] = calibration_fit.calibrate_model(
            model, spec, splits.x_train, splits.y_train, splits.x_val, splits.y_val, splits.x_test, splits.y_test
        )
        # The drift reference on the same held-out images, beside the model: the import stores it.
        reference = calibration_fit.fit_drift_reference(
            model, spec, metrics["calibration"], splits.x_val, f"train.py: {len(splits.x_val)} held-out images"
        )
        (out_dir / REFERENCE_FILE).write_bytes(reference.to_bytes())
    metrics["wall_time_s"] = round(time.monotonic() - started, 1)
    metrics["report_files"] = write_report(out_dir / "report", metrics.pop("evaluation"), splits.class_names, history)
    metrics_schema.write_metrics(out_dir / "metrics.json", metrics)
    _print_summary(metrics)
    print(f"saved {model_path} ({model_path.stat().st_size / 1e6:.1f} MB), {out_dir / 'metrics.json'}")
    if args.import_model:
        import_trained(model_path, metrics, args.name)
    return metrics


def arch_options(args) -> dict:
    """The architecture's own options given on the command line (only the strong one has any)."""
    return {"widths": args.widths} if args.widths else {}


def _metrics(args, recipe: Recipe, splits: ImageSplits, model, spec: ModelSpec, history, train_seconds) -> dict:
    """Every figure of a run: test accuracy through the serving predictor (its TTA included),
    the held-out curve, the recipe, data provenance and inference cost."""
    predictor = Predictor(model, spec)
    evaluation = evaluate_predictor(predictor, splits.x_test, splits.y_test)
    print_evaluation(evaluation, splits.class_names)
    other_modes = [mode for mode in TTA_MODES if mode != spec.tta]
    val_curve = history.get("val_accuracy", [0.0])
    return {
        "arch": args.arch,
        "arch_options": arch_options(args),
        "class_names": list(splits.class_names),
        "input_shape": list(spec.input_shape),
        "input_scale": spec.input_scale,
        "output_kind": spec.output_kind,
        "tta": spec.tta,
        "test_accuracy": evaluation["accuracy"],
        "test_accuracy_other_tta": accuracy_by_tta(model, spec, splits.x_test, splits.y_test, other_modes),
        "per_class_accuracy": evaluation["per_class_accuracy"],
        "confusion_matrix": evaluation["confusion_matrix"],
        "evaluation": evaluation,
        "best_val_accuracy": max(val_curve),
        "final_val_accuracy": val_curve[-1],
        "final_val_accuracy_tta": evaluate_predictor(predictor, splits.x_val, splits.y_val)["accuracy"],
        "epochs": recipe.epochs,
        "recipe": recipe.as_dict(),
        "random_seed": args.random_seed,
        "distribute": args.distribute,
        "train_images": len(splits.x_train),
        "val_images": len(splits.x_val),
        "val_fraction": args.val_fraction,
        "test_images": len(splits.x_test),
        "data_source": splits.source,
        "data_sha256": splits.sha256,
        "parameters": int(model.count_params()),
        "train_time_s": round(train_seconds, 1),
        "inference": measure_inference(predictor),
        "inference_other_tta": [measure_inference(Predictor(model, replace(spec, tta=mode))) for mode in other_modes],
        "cpu_count": os.cpu_count(),
        "command": "python train.py " + " ".join(sys.argv[1:]),
        "history": history,
    }


def _print_summary(metrics: dict) -> None:
    inference = metrics["inference"]
    print(
        f"summary: arch={metrics['arch']} test_accuracy={metrics['test_accuracy'] * 100:.2f}% "
        f"(tta {metrics['tta']}) best_val_accuracy={metrics['best_val_accuracy'] * 100:.2f}% "
        f"epochs={metrics['epochs']} wall={metrics['wall_time_s'] / 60:.1f}min params={metrics['parameters']:,} "
        f"infer={inference['images_per_s_batch64']:.0f}img/s(b64) {inference['ms_one_image_p50']:.1f}ms(1img,p50)"
    )


def import_trained(model_path: Path, metrics: dict, name: str) -> None:
    """Store a trained model in the registry with its metrics, and activate it."""
    import model_store
    from database import open_database
    from monitoring import store as drift_store

    with open_database():
        model_store.init_db()
        row = model_store.import_model(model_path, name=name, metrics=metrics, activate=True)
        if model_path.with_name(REFERENCE_FILE).is_file():
            drift_store.set_reference(row.id, Reference.from_bytes(model_path.with_name(REFERENCE_FILE).read_bytes()))
        print(f"imported as model {row.id} ({row.name} v{row.version}) and activated")


def read_spec(model_path: Path, model) -> ModelSpec:
    """The serving spec of a model file: its metrics.json beside it, else the seed's defaults."""
    sidecar = model_path.with_name("metrics.json")
    metrics = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    return ModelSpec.from_metrics(metrics, model.input_shape[1:])


def evaluate(args) -> dict:
    """Evaluate a saved model on a data set's test split (or its held-out training images);
    print and write the report."""
    model_path = Path(args.model)
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    spec = read_spec(model_path, model)
    splits = load_splits(args.data, spec.input_shape[0], args.held_out, args.random_seed)
    if splits.class_names != spec.class_names:
        raise SystemExit(f"error: the data's classes {splits.class_names} differ from the model's {spec.class_names}")
    images, labels = (splits.x_val, splits.y_val) if args.held_out else (splits.x_test, splits.y_test)
    evaluation = evaluate_predictor(Predictor(model, spec), images, labels)
    print_evaluation(evaluation, spec.class_names)
    other_modes = [mode for mode in TTA_MODES if mode != spec.tta]
    for mode, accuracy in accuracy_by_tta(model, spec, images, labels, other_modes).items():
        print(f"accuracy with tta {mode}: {accuracy * 100:.2f} %")
    out_dir = Path(args.out) if args.out else model_path.parent / "evaluation"
    write_report(out_dir, evaluation, spec.class_names, None)
    print(f"report written to {out_dir}")
    return evaluation


def _evaluate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py evaluate", description="Evaluate a saved model.")
    parser.add_argument("model", help="model file (.h5 or .keras); metrics.json beside it gives classes and TTA")
    parser.add_argument("--data", help="archive or folder with test/<class>/* (default: CIFAR-10)")
    parser.add_argument("--out", help="report folder (default: evaluation/ beside the model)")
    parser.add_argument(
        "--held-out",
        type=float,
        default=0.0,
        help="evaluate on this stratified fraction of the training images instead of the test split, to compare "
        "models on validation: held-out parts with one seed nest, so a model trained with a larger --val-fraction "
        "never saw them",
    )
    parser.add_argument("--random-seed", type=int, default=0, help="the seed of the held-out split")
    return parser


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train a CIFAR-10 (or image-folder) classifier.")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="strong")
    parser.add_argument(
        "--data", help="image-folder archive or folder (default: Keras' CIFAR-10 cache, else ../shared/data)"
    )
    parser.add_argument(
        "--widths",
        type=parse_widths,
        help="strong arch: channels of its three conv groups (default 64,256,256), e.g. 32,128,256",
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size, split across replicas")
    parser.add_argument("--learning-rate", type=float, help="strong arch: per 1,024 images, as airbench")
    parser.add_argument("--weight-decay", type=float, help="strong arch: per 1,024 images, as airbench")
    parser.add_argument("--translate", type=int, help="random translation in pixels (0: off)")
    parser.add_argument("--cutout", type=int, help="grey out a random NxN square (0: off)")
    parser.add_argument("--random-seed", type=int, default=0, help="seeds the split, weights and augmentation")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.04,
        help="fraction of train images held out (stratified) for the validation curve and calibration",
    )
    parser.add_argument("--image-size", type=int, default=32, help="square input size for image folders")
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--jit-compile", action=argparse.BooleanOptionalAction, help="XLA-compile the training step")
    parser.add_argument("--distribute", choices=("none", "mirrored", "multiworker"), default="none")
    parser.add_argument("--logical-cpus", type=int, default=1, help="split the CPU into N logical devices")
    parser.add_argument("--out", default="instance/training/latest", help="folder for model.h5, metrics.json, report/")
    parser.add_argument("--import", dest="import_model", action="store_true", help="store and activate in the registry")
    parser.add_argument("--name", default="cifar10-cnn", help="registry name for --import")
    parser.add_argument("--verbose", type=int, default=1, help="0: quiet; otherwise one line an epoch")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse `train.py [train] ...` or `train.py evaluate MODEL ...`."""
    if argv and argv[0] == "evaluate":
        args = _evaluate_parser().parse_args(argv[1:])
        args.command = "evaluate"
        return args
    parser = _train_parser()
    args = parser.parse_args(argv[1:] if argv and argv[0] == "train" else argv)
    if args.widths and args.arch != "strong":
        parser.error(f"--widths sets the strong network's groups; --arch {args.arch} has none")
    args.command = "train"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "evaluate":
        evaluate(args)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
