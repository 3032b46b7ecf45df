"""Calibrated probabilities and the decision for each answer: confident, unsure or unknown.

The statistics here are fitted on held-out images (a calibration split the model never trained
on) and only measured on the test split. Flask-free and numpy-only, so `train.py`, `flask
calibrate` and serving share them. A model without a calibration record is served as documented
in the README: plain softmax, every answer "confident", no out-of-distribution score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from inference.ood import OodStats, has_arrays, join_arrays, split_arrays
from predictor import softmax

DECISIONS = ("confident", "unsure", "unknown")
ECE_BINS = 15
DEFAULT_TARGET_ACCURACY = 0.98
LOGIT_NORMS = ("none", "l2")
# Temperatures searched (log-spaced bounds): wide enough for label-smoothed models (T < 1) and
# for normalised logits, whose norm is 1 (T near 0.05).
TEMPERATURE_BOUNDS = (0.005, 50.0)
CURVE_POINTS = 50


def normalise_logits(logits: np.ndarray, method: str) -> np.ndarray:
    """Post-hoc logit normalisation: 'l2' centres each row and divides by its L2 norm.

    Label smoothing squeezes the logits of confident and unsure answers to similar scales;
    dividing by the norm restores the ranking (Cattelan & Silva, 2024, MaxLogit-pNorm).
    """
    if method == "none":
        return logits
    centred = logits - logits.mean(axis=-1, keepdims=True)
    return centred / np.maximum(np.linalg.norm(centred, axis=-1, keepdims=True), 1e-12)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean NLL of softmax(logits / temperature) at the true labels."""
    scaled = logits / temperature
    shifted = scaled - scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, iterations: int = 80) -> float:
    """The temperature minimising the NLL on held-out logits (golden-section search on log T).

    The NLL is convex in 1/T, so it is unimodal in log T and the search finds the minimum.
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = (negative_log_likelihood(logits, labels, math.exp(x)) for x in (a, b))
    for _ in range(iterations):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = negative_log_likelihood(logits, labels, math.exp(a))
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = negative_log_likelihood(logits, labels, math.exp(b))
    return math.exp((low + high) / 2)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per equal-width confidence bin: its range, image count, mean confidence and accuracy."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin i holds confidences in (i/bins, (i+1)/bins]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        rows.append(
            {
                "low": i / bins,
                "high": (i + 1) / bins,
                "count": count,
                "confidence": float(confidence[members].mean()) if count else None,
                "accuracy": float(correct[members].mean()) if count else None,
            }
        )
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over the bins."""
    rows = reliability(probabilities, labels, bins)
    total = sum(row["count"] for row in rows)
    return float(sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows if row["count"]) / total)


def _ranked_accuracy(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidences sorted high to low, and the accuracy of the k most confident answers for each k."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order])
    return confidence[order], hits / np.arange(1, len(order) + 1)


def confidence_threshold(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest threshold such that answers at or above it are right at least `target` of the
    time; 1.0 (almost nothing confident) when even the most confident answers miss the target."""
    ranked, accuracy = _ranked_accuracy(np.asarray(confidence), np.asarray(correct, bool))
    # A threshold keeps every answer tied with it, so only the last of a tie can be the cut.
    last_of_tie = np.append(ranked[1:] < ranked[:-1], True)
    passing = np.flatnonzero((accuracy >= target) & last_of_tie)
    return float(ranked[passing[-1]]) if len(passing) else 1.0


def coverage_at_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The largest share of images that can be answered, most confident first, at `target` accuracy."""
    _, accuracy = _ranked_accuracy(np.asarray(confidence), np.asarray(correct, bool))
    passing = np.flatnonzero(accuracy >= target)
    return float((passing[-1] + 1) / len(accuracy)) if len(passing) else 0.0


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, points: int = CURVE_POINTS) -> dict:
    """The risk-coverage curve (error rate of the most confident answers against their share),
    sampled at `points` coverages, and its area (AURC: lower is better)."""
    _, accuracy = _ranked_accuracy(np.asarray(confidence), np.asarray(correct, bool))
    n = len(accuracy)
    picks = np.unique(np.clip(np.round(np.linspace(1, n, points)).astype(int), 1, n)) - 1
    return {
        "coverage": [round(float((k + 1) / n), 4) for k in picks],
        "risk": [round(float(1 - accuracy[k]), 4) for k in picks],
        "aurc": float(np.mean(1 - accuracy)),
    }


def _fit_logit_scaling(logits: np.ndarray, labels: np.ndarray, method: str) -> tuple[float, float]:
    """(temperature, AURC) for one normalisation choice, on the held-out images."""
    normalised = normalise_logits(logits, method)
    temperature = fit_temperature(normalised, labels)
    probabilities = softmax(normalised / temperature)
    correct = probabilities.argmax(axis=1) == labels
    return temperature, risk_coverage(probabilities.max(axis=1), correct)["aurc"]


def _selective_report(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """ECE, coverage at 98/99 % accuracy and what the threshold does, for one split."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    kept = confidence >= threshold
    return {
        "images": len(labels),
        "accuracy": float(correct.mean()),
        "ece": expected_calibration_error(probabilities, labels),
        "coverage_at_98": coverage_at_accuracy(confidence, correct, 0.98),
        "coverage_at_99": coverage_at_accuracy(confidence, correct, 0.99),
        "threshold_coverage": float(kept.mean()),
        "threshold_accuracy": float(correct[kept].mean()) if kept.any() else None,
    }


def fit_calibration(
    heldout_logits: np.ndarray,
    heldout_labels: np.ndarray,
    test_logits: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    target_accuracy: float = DEFAULT_TARGET_ACCURACY,
) -> dict:
    """Fit the temperature, the logit normalisation and the confidence threshold on held-out
    logits; measure ECE, reliability and risk-coverage before and after on the test split when
    given (else on the held-out images, and the record says so)."""
    heldout_logits = np.asarray(heldout_logits, np.float64)
    heldout_labels = np.asarray(heldout_labels, np.int64)
    choices = {method: _fit_logit_scaling(heldout_logits, heldout_labels, method) for method in LOGIT_NORMS}
    method = min(choices, key=lambda name: choices[name][1])
    temperature = choices[method][0]
    calibrated = softmax(normalise_logits(heldout_logits, method) / temperature)
    threshold = confidence_threshold(
        calibrated.max(axis=1), calibrated.argmax(axis=1) == heldout_labels, target_accuracy
    )
    measured_on = "test" if test_logits is not None else "held-out"
    logits = np.asarray(test_logits if test_logits is not None else heldout_logits, np.float64)
    labels = np.asarray(test_labels if test_labels is not None else heldout_labels, np.int64)
    before = softmax(logits)
    after = softmax(normalise_logits(logits, method) / temperature)
    return {
        "temperature": temperature,
        "logit_norm": method,
        "aurc_by_logit_norm": {name: aurc for name, (_, aurc) in choices.items()},
        "target_accuracy": target_accuracy,
        "confidence_threshold": threshold,
        "heldout_images": len(heldout_labels),
        "measured_on": measured_on,
        "before": _selective_report(before, labels, threshold),
        "after": _selective_report(after, labels, threshold),
        "reliability_before": reliability(before, labels),
        "reliability_after": reliability(after, labels),
        "risk_coverage": risk_coverage(after.max(axis=1), after.argmax(axis=1) == labels),
    }


@dataclass(frozen=True)
class Calibration:
    """What serving applies to a model's logits: temperature, normalisation, thresholds, OOD."""

    temperature: float = 1.0
    logit_norm: str = "none"
    confidence_threshold: float | None = None
    ood: OodStats | None = None

    @classmethod
    def from_record(cls, record: dict | None) -> Calibration:
        """From a stored calibration record; an empty one (no record) is the uncalibrated default."""
        if not record:
            return cls()
        ood = OodStats.from_record(record["ood"]) if record.get("ood") else None
        return cls(float(record["temperature"]), record["logit_norm"], float(record["confidence_threshold"]), ood)

    @property
    def calibrated(self) -> bool:
        return self.confidence_threshold is not None

    @property
    def feature_layers(self) -> tuple[str, ...]:
        return self.ood.layers if self.ood else ()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """softmax(normalise(logits) / T)."""
        return softmax(normalise_logits(logits, self.logit_norm) / self.temperature)

    def ood_scores(self, logits: np.ndarray, features: list[np.ndarray]) -> np.ndarray | None:
        return self.ood.scores(logits, features) if self.ood else None

    def decide(self, top_probability: float, ood_score: float | None) -> str:
        """'unknown' above the OOD threshold, else 'unsure' below the confidence threshold."""
        if self.ood is not None and ood_score is not None and ood_score > self.ood.threshold:
            return "unknown"
        if self.confidence_threshold is not None and top_probability < self.confidence_threshold:
            return "unsure"
        return "confident"


def split_record(record: dict) -> tuple[dict, bytes | None]:
    """A whole calibration record as the small JSON the registry and metrics.json keep, and the
    BLOB of its OOD arrays (None without an OOD part)."""
    if not (record.get("ood") and has_arrays(record["ood"])):
        return record, None
    small_ood, blob = split_arrays(record["ood"])
    return {**record, "ood": small_ood}, blob


def join_record(record: dict, stats: bytes | None) -> dict:
    """The whole record again from `split_record`'s parts (a record with its arrays inline, as
    old metrics.json files have them, is already whole)."""
    if not record.get("ood") or has_arrays(record["ood"]):
        return record
    if stats is None:
        raise ValueError("the calibration's OOD statistics are missing (no calibration.safetensors or BLOB)")
    return {**record, "ood": join_arrays(record["ood"], stats)}


def summary(record: dict | None) -> dict:
    """The small public part of a calibration record: what the API lists and the card heads with."""
    if not record:
        return {"calibrated": False}
    ood = record.get("ood") or {}
    return {
        "calibrated": True,
        "temperature": record["temperature"],
        "logit_norm": record["logit_norm"],
        "target_accuracy": record["target_accuracy"],
        "confidence_threshold": record["confidence_threshold"],
        "ood_threshold": ood.get("threshold"),
        "ood_layers": ood.get("layers"),
        "measured_on": record["measured_on"],
        "ece_before": record["before"]["ece"],
        "ece_after": record["after"]["ece"],
        "coverage_at_98": record["after"]["coverage_at_98"],
        "coverage_at_99": record["after"]["coverage_at_99"],
        "source": record.get("source"),
    }
