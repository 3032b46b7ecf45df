"""Calibrating a model end to end: run it over training, held-out and test images and fit the
calibration record that the registry stores (inference/calibration.py for probabilities and thresholds,
inference/ood.py for the out-of-distribution score).

`train.py` calls `calibrate_model` at the end of a run with its own splits; `flask calibrate`
calls `calibrate_folder` for a model imported without a calibration. Both then fit the model's
drift reference on the same held-out images (`fit_drift_reference`). Given the serving engine
(`engine`: an int8 conversion, whose outputs differ from Keras'), all of it is fitted on the
engine's outputs instead, and the record says so (`fitted_on`, which serving checks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference import calibration, ood
from predictor import Forward, ModelSpec, Predictor

# Class means and one covariance of a few hundred channels are stable from this many images;
# more only costs time.
DEFAULT_MAX_FIT_IMAGES = 10_000
BATCH = 500


def model_outputs(predictor: Predictor, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Logits and pooled features for many images, in batches, TTA views averaged as served."""
    chunks = [predictor.infer(images[start : start + BATCH]) for start in range(0, len(images), BATCH)]
    logits = np.concatenate([c[0] for c in chunks])
    features = [np.concatenate([c[1][i] for c in chunks]) for i in range(len(predictor.feature_layers))]
    return logits, features


def _subsample(images: np.ndarray, labels: np.ndarray, limit: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if len(images) <= limit:
        return images, labels
    keep = np.sort(np.random.default_rng(seed).choice(len(images), limit, replace=False))
    return images[keep], labels[keep]


def calibrate_model(
    model,
    spec: ModelSpec,
    fit_images: np.ndarray,
    fit_labels: np.ndarray,
    heldout_images: np.ndarray,
    heldout_labels: np.ndarray,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    *,
    target_accuracy: float = calibration.DEFAULT_TARGET_ACCURACY,
    layers: tuple[str, ...] | None = None,
    max_fit_images: int = DEFAULT_MAX_FIT_IMAGES,
    source: str = "train.py",
    engine=None,
) -> dict:
    """The calibration record for a Keras model (uint8 images, integer labels in the model's
    class order): temperature, logit normalisation and "not sure" threshold from the held-out
    images; OOD Gaussians from (at most `max_fit_images` of) the training images, standardised
    and thresholded on the held-out ones; ECE, reliability and risk-coverage measured on the
    test images when given. The held-out images must not have been trained on. With `engine`
    (lite_engine.LiteEngine), the engine's outputs are fitted instead of the Keras model's."""
    layers = ood.default_layers(model) if layers is None else tuple(layers)
    predictor = Predictor(model, spec, feature_layers=layers, forward=_engine_forward(engine, layers))
    fit_images, fit_labels = _subsample(fit_images, np.asarray(fit_labels), max_fit_images)
    _, fit_features = model_outputs(predictor, fit_images)
    heldout_logits, heldout_features = model_outputs(predictor, heldout_images)
    test_logits = model_outputs(predictor, test_images)[0] if test_images is not None and len(test_images) else None
    record = calibration.fit_calibration(
        heldout_logits,
        heldout_labels,
        test_logits,
        test_labels if test_logits is not None else None,
        target_accuracy,
    )
    if layers:
        stats = ood.fit_ood(layers, fit_features, fit_labels, heldout_logits, heldout_features, len(spec.class_names))
        record["ood"] = stats.to_record()
    record["source"] = source
    record["fitted_on"] = engine.metadata["format"] if engine is not None else "keras"
    return record


def _engine_forward(engine, layers: tuple[str, ...]) -> Forward | None:
    """The engine's forward for `layers` (None: the Keras model's)."""
    return engine.forward(layers) if engine is not None else None


@dataclass(frozen=True)
class FolderSplits:
    """An image-folder data set split as calibration uses it, labels in the model's class order."""

    fit_images: np.ndarray
    fit_labels: np.ndarray
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    test_images: np.ndarray | None
    test_labels: np.ndarray | None
    source: str


def folder_splits(spec: ModelSpec, data: Path, val_fraction: float, seed: int) -> FolderSplits:
    """Its train/<class>/ images split, stratified and seeded, into OOD-fitting and held-out images
    (the same split train.py makes, so `--val-fraction 0.1 --seed 0` reproduces the old recipe's
    validation split); test/<class>/ images, when present, only measure."""
    from training.data import read_image_folder, stratified_split

    class_names, splits = read_image_folder(data, spec.input_shape[0])
    missing = set(class_names) - set(spec.class_names)
    if missing:
        raise ValueError(f"the data set has classes the model does not know: {', '.join(sorted(missing))}")
    # The data set's label order is its own; map it onto the model's output order.
    to_model = np.array([spec.class_names.index(name) for name in class_names])
    x_all, y_all = splits["train"][0], to_model[splits["train"][1]]
    fit_idx, heldout_idx = stratified_split(y_all, val_fraction, seed)
    if len(heldout_idx) == 0 or len(fit_idx) == 0:
        raise ValueError("too few training images to split off held-out ones: raise --val-fraction or add images")
    x_test, y_test = splits["test"][0], to_model[splits["test"][1]] if len(splits["test"][1]) else None
    source = f"flask calibrate: {data.name}, {len(heldout_idx)} held-out images (fraction {val_fraction}, seed {seed})"
    return FolderSplits(
        x_all[fit_idx],
        y_all[fit_idx],
        x_all[heldout_idx],
        y_all[heldout_idx],
        x_test if len(x_test) else None,
        y_test,
        source,
    )


def calibrate_folder(
    model,
    spec: ModelSpec,
    data: Path | FolderSplits,
    val_fraction: float = 0.1,
    seed: int = 0,
    target_accuracy: float = calibration.DEFAULT_TARGET_ACCURACY,
    engine=None,
) -> dict:
    """Calibrate on an image-folder data set (folder or archive, as `train.py --data` reads, split
    by `folder_splits`), or on splits already read; on `engine`'s outputs when given."""
    splits = data if isinstance(data, FolderSplits) else folder_splits(spec, data, val_fraction, seed)
    return calibrate_model(
        model,
        spec,
        splits.fit_images,
        splits.fit_labels,
        splits.heldout_images,
        splits.heldout_labels,
        splits.test_images,
        splits.test_labels,
        target_accuracy=target_accuracy,
        source=splits.source,
        engine=engine,
    )


def fit_drift_reference(model, spec: ModelSpec, record: dict, heldout_images: np.ndarray, source: str, engine=None):
    """The drift reference (monitoring/reference.py) of a model with its calibration `record`,
    on the held-out images that calibration was fitted on (through `engine` when given)."""
    from monitoring.reference import fit_reference

    fitted = calibration.Calibration.from_record(record)
    predictor = Predictor(model, spec, fitted, forward=_engine_forward(engine, fitted.feature_layers))
    return fit_reference(predictor, heldout_images, source)
