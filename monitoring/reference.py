"""A model's drift reference: what its answers and inputs look like on the held-out images its
calibration was fitted on, and the PCA that turns its pooled features into a few coordinates.

Fitted once per model beside its calibration (train.py, `flask calibrate`, `flask drift
fit-reference`), stored with the model in the registry (monitoring/store.py) as one safetensors
BLOB: per held-out image its predicted class, calibrated top probability, decision, OOD score and
image statistics; the PCA's mean and components; and a sample of the images' PCA coordinates for
the MMD test. Flask-free.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, replace

import numpy as np

from inference.calibration import DECISIONS
from inference.image_statistics import ImageStatistics, image_statistics
from monitoring.drift import IMAGE_STATISTICS, Sample
from registry.model_files import ModelFileError, read_header

PCA_COMPONENTS = 16
EMBEDDING_SAMPLE = 500
BATCH = 500
FORMAT = "imgcls-drift-reference"
# The reference file beside a model file (train.py writes it; `flask models import` stores it).
REFERENCE_FILE = "drift_reference.safetensors"


@dataclass(frozen=True)
class Pca:
    """A PCA projection: centre, then onto the leading principal axes (k x features)."""

    mean: np.ndarray
    components: np.ndarray
    explained: np.ndarray  # share of the variance each component explains

    def project(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, np.float64) - self.mean) @ self.components.T


def fit_pca(features: np.ndarray, components: int = PCA_COMPONENTS) -> Pca:
    """The leading principal axes of the rows of `features` (SVD of the centred matrix)."""
    features = np.asarray(features, np.float64)
    mean = features.mean(axis=0)
    _, singular, axes = np.linalg.svd(features - mean, full_matrices=False)
    k = min(components, len(axes))
    variance = singular**2
    return Pca(mean, axes[:k], variance[:k] / max(variance.sum(), 1e-12))


@dataclass(frozen=True)
class Reference:
    """A model's reference sample (drift.Sample) with its class names, PCA and provenance."""

    class_names: tuple[str, ...]
    sample: Sample
    pca: Pca | None
    source: str

    def project(self, features: np.ndarray | None) -> np.ndarray | None:
        """PCA coordinates of pooled features (None without a PCA or features)."""
        if self.pca is None or features is None:
            return None
        return self.pca.project(np.atleast_2d(features))

    def decided_by(self, calibration) -> Reference:
        """The same reference with each image's decision taken again by `calibration`'s thresholds
        (inference.calibration.Calibration) from its stored top probability and OOD score: when a
        threshold moves (the label queue's OOD tuning), the served decisions move with it, and a
        reference left with the old ones would report the change as drift."""
        decisions = decided(calibration, self.sample.top_probability, self.sample.ood_scores)
        return replace(self, sample=replace(self.sample, decisions=decisions))

    def summary(self) -> dict:
        """The small public part: what the monitoring page and the model card show."""
        sample = self.sample
        counts = np.bincount(sample.classes, minlength=len(self.class_names))
        return {
            "images": len(sample),
            "source": self.source,
            "class_distribution": {n: float(c / len(sample)) for n, c in zip(self.class_names, counts, strict=True)},
            "estimated_accuracy": float(sample.top_probability.mean()),
            "unsure_rate": sample.rate("unsure"),
            "unknown_rate": sample.rate("unknown"),
            "image_statistics": {n: float(sample.statistics[:, i].mean()) for i, n in enumerate(IMAGE_STATISTICS)},
            "pca_components": 0 if self.pca is None else len(self.pca.components),
            "pca_explained": None if self.pca is None else float(self.pca.explained.sum()),
        }

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        sample = self.sample
        tensors = {
            "classes": sample.classes.astype(np.int32),
            "top_probability": sample.top_probability.astype(np.float32),
            "decisions": np.array([DECISIONS.index(d) for d in sample.decisions], np.int8),
            "statistics": sample.statistics.astype(np.float32),
        }
        if sample.ood_scores is not None:
            tensors["ood_scores"] = sample.ood_scores.astype(np.float32)
        if self.pca is not None:
            tensors |= {
                "pca/mean": self.pca.mean.astype(np.float32),
                "pca/components": self.pca.components.astype(np.float32),
                "pca/explained": self.pca.explained.astype(np.float32),
                "embeddings": sample.embeddings.astype(np.float32),
            }
        metadata = {"format": FORMAT, "class_names": json.dumps(list(self.class_names)), "source": self.source}
        return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes) -> Reference:
        from safetensors.numpy import load

        try:
            metadata = read_header(io.BytesIO(data)).get("__metadata__") or {}
        except ModelFileError as exc:
            raise ValueError(f"not a drift reference file: {exc}") from exc
        if metadata.get("format") != FORMAT:
            raise ValueError("not a drift reference file")
        tensors = load(data)
        as64 = {k: np.asarray(v, np.float64) for k, v in tensors.items()}
        pca = None
        if "pca/mean" in tensors:
            pca = Pca(as64["pca/mean"], as64["pca/components"], as64["pca/explained"])
        sample = Sample(
            classes=tensors["classes"].astype(np.int64),
            top_probability=as64["top_probability"],
            decisions=np.array(DECISIONS)[tensors["decisions"]],
            ood_scores=as64.get("ood_scores"),
            statistics=as64["statistics"],
            embeddings=as64.get("embeddings"),
        )
        return cls(tuple(json.loads(metadata["class_names"])), sample, pca, metadata.get("source", ""))


def decided(calibration, top_probability: np.ndarray, ood_scores: np.ndarray | None) -> np.ndarray:
    """Each image's decision by `calibration`'s thresholds (inference.calibration.Calibration)."""
    scores = ood_scores if ood_scores is not None else [None] * len(top_probability)
    decisions = [
        calibration.decide(float(p), None if o is None else float(o))
        for p, o in zip(top_probability, scores, strict=True)
    ]
    return np.array(decisions)


def statistics_row(statistics: ImageStatistics) -> list[float]:
    """One image's statistics in IMAGE_STATISTICS order."""
    return [float(getattr(statistics, name)) for name in IMAGE_STATISTICS]


def fit_reference(predictor, images: np.ndarray, source: str, seed: int = 0) -> Reference:
    """The reference of a calibrated predictor (predictor.Predictor) on held-out uint8 images at
    its input size: answers as served (TTA views averaged, calibrated), image statistics, and a
    PCA of the last OOD layer's pooled features, the deepest features the served model computes."""
    calibration = predictor.calibration
    if calibration is None or not calibration.calibrated:
        raise ValueError("the model has no calibration: fit the reference with it (flask calibrate)")
    chunks = [predictor.infer(images[start : start + BATCH]) for start in range(0, len(images), BATCH)]
    logits = np.concatenate([c[0] for c in chunks])
    features = [np.concatenate([c[1][i] for c in chunks]) for i in range(len(chunks[0][1]))]
    probabilities = calibration.probabilities(logits)
    ood_scores = calibration.ood_scores(logits, features)
    top = probabilities.max(axis=1)
    pca = fit_pca(features[-1]) if features else None
    embeddings = None
    if pca is not None:
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(images), min(EMBEDDING_SAMPLE, len(images)), replace=False)
        embeddings = pca.project(features[-1][np.sort(picked)])
    sample = Sample(
        classes=probabilities.argmax(axis=1),
        top_probability=top.astype(np.float64),
        decisions=decided(calibration, top, ood_scores),
        ood_scores=ood_scores,
        statistics=np.array([statistics_row(image_statistics(image)) for image in images], np.float64),
        embeddings=embeddings,
    )
    return Reference(tuple(predictor.spec.class_names), sample, pca, source)
