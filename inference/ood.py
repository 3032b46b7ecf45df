"""Out-of-distribution score: is an image like anything the model was trained on?

The score sums two standardised parts, each higher for stranger images:
- per chosen layer, the class-conditional Mahalanobis distance (class means, one shared
  covariance, fitted on training images) of the layer's average-pooled output;
- the energy of the logits, -logsumexp(logits).
Each part is standardised with its mean and spread on held-out images, and the threshold is
the held-out images' 95th percentile. The statistics live in the registry beside the model, not
in the file (the saved model stays standard and loads in safe mode); serving builds a model with
the extra outputs at load time (`with_pooled_features`), so the score costs no second pass.

Stored, the record is split (`split_arrays`): the class means and precision matrices (megabytes)
go to a safetensors BLOB keyed `<layer>/means` and `<layer>/precisions`, the rest (layers,
standardisation, threshold) stays in the small JSON that the model card reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

HELDOUT_PASS_RATE = 0.95
# Shrinks the shared covariance towards its mean variance so the inverse stays stable when a
# layer has more channels than the fit has images per class.
SHRINKAGE = 0.01


def block_ends(model) -> list[str]:
    """The last layer at each spatial resolution of a convolutional model: its block outputs."""
    ends: dict[tuple, str] = {}
    for layer in model.layers:
        shape = getattr(layer, "output", None) is not None and tuple(layer.output.shape)
        if shape and len(shape) == 4:
            ends[shape[1:3]] = layer.name  # a later layer at the same resolution replaces it
    return list(ends.values())


def default_layers(model) -> tuple[str, ...]:
    """Intermediate block outputs: neither the stem (little more than colour) nor the last block
    (its pooled features barely separate strange images: AUROC 0.55 in issue 11's probe)."""
    ends = block_ends(model)
    return tuple(ends[1:-1] if len(ends) >= 3 else ends)


def with_pooled_features(model, layer_names: tuple[str, ...]):
    """A Keras model with the original output first, then each named layer's channel means."""
    import keras

    pooled = [keras.ops.mean(model.get_layer(name).output, axis=(1, 2)) for name in layer_names]
    return keras.Model(model.inputs, [model.outputs[0], *pooled])


def energy(logits: np.ndarray) -> np.ndarray:
    """-logsumexp(logits): high when no class has a large logit."""
    top = logits.max(axis=1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))


def fit_gaussian(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Class means and the precision (inverse) of the shared within-class covariance."""
    features = np.asarray(features, np.float64)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(num_classes)])
    centred = features - means[labels]
    covariance = centred.T @ centred / len(features)
    scale = np.trace(covariance) / len(covariance)
    covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * scale * np.eye(len(covariance))
    return means, np.linalg.inv(covariance)


def mean_terms(means: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """precision @ means.T and each mean's own term mean . precision . mean: the parts of every
    distance that do not depend on the image (worth a millisecond a request at 256 channels)."""
    precision_means = precision @ means.T
    return precision_means, np.einsum("dc,cd->c", precision_means, means)


def mahalanobis(
    features: np.ndarray, means: np.ndarray, precision: np.ndarray, terms: tuple | None = None
) -> np.ndarray:
    """Squared distance to the nearest class mean, for each row (`terms`: `mean_terms`, if kept)."""
    features = np.asarray(features, np.float64)
    precision_means, own_terms = terms or mean_terms(means, precision)
    distances = (
        np.einsum("nd,nd->n", features @ precision, features)[:, None]
        - 2 * features @ precision_means
        + own_terms[None, :]
    )
    return distances.min(axis=1)


@dataclass(frozen=True)
class OodStats:
    """Everything needed to score an image: layers, Gaussians, standardisation and threshold."""

    layers: tuple[str, ...]
    means: tuple[np.ndarray, ...]
    precisions: tuple[np.ndarray, ...]
    centre: np.ndarray  # per part (each layer's distance, then energy): held-out mean
    spread: np.ndarray  # ... and standard deviation; 0 drops the part (constant energy)
    threshold: float

    @cached_property
    def _mean_terms(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        return tuple(mean_terms(m, p) for m, p in zip(self.means, self.precisions, strict=True))

    def parts(self, logits: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
        """N x parts raw scores: each layer's distance, then the energy."""
        layers = zip(features, self.means, self.precisions, self._mean_terms, strict=True)
        distances = [mahalanobis(f, m, p, terms) for f, m, p, terms in layers]
        return np.column_stack([*distances, energy(logits)])

    def scores(self, logits: np.ndarray, features: list[np.ndarray]) -> np.ndarray:
        """The combined score per image: the sum of the standardised parts."""
        return standardised_sum(self.parts(logits, features), self.centre, self.spread)

    def to_record(self) -> dict:
        return {
            "layers": list(self.layers),
            "means": [_rounded(m) for m in self.means],
            "precisions": [_rounded(p) for p in self.precisions],
            "centre": _rounded(self.centre),
            "spread": _rounded(self.spread),
            "threshold": float(self.threshold),
            "parts": [*(f"mahalanobis:{name}" for name in self.layers), "energy"],
            "heldout_pass_rate": HELDOUT_PASS_RATE,
        }

    @classmethod
    def from_record(cls, record: dict) -> OodStats:
        return cls(
            tuple(record["layers"]),
            tuple(np.asarray(m, np.float64) for m in record["means"]),
            tuple(np.asarray(p, np.float64) for p in record["precisions"]),
            np.asarray(record["centre"], np.float64),
            np.asarray(record["spread"], np.float64),
            float(record["threshold"]),
        )


def standardised_sum(parts: np.ndarray, centre: np.ndarray, spread: np.ndarray) -> np.ndarray:
    """Sum over parts of (part - centre) / spread, leaving out parts whose spread is zero."""
    used = spread > 1e-12
    return ((parts[:, used] - centre[used]) / spread[used]).sum(axis=1)


def fit_ood(
    layers: tuple[str, ...],
    fit_features: list[np.ndarray],
    fit_labels: np.ndarray,
    heldout_logits: np.ndarray,
    heldout_features: list[np.ndarray],
    num_classes: int,
) -> OodStats:
    """Gaussians on training features; standardisation and the 95 %-pass threshold on held-out ones."""
    fitted = [fit_gaussian(f, np.asarray(fit_labels), num_classes) for f in fit_features]
    draft = OodStats(layers, tuple(m for m, _ in fitted), tuple(p for _, p in fitted), np.zeros(0), np.zeros(0), 0.0)
    parts = draft.parts(np.asarray(heldout_logits, np.float64), heldout_features)
    centre, spread = parts.mean(axis=0), parts.std(axis=0)
    threshold = float(np.quantile(standardised_sum(parts, centre, spread), HELDOUT_PASS_RATE))
    return OodStats(draft.layers, draft.means, draft.precisions, centre, spread, threshold)


ARRAY_KEYS = ("means", "precisions")


def split_arrays(record: dict) -> tuple[dict, bytes]:
    """A whole OOD record as its small JSON part and a safetensors BLOB of the per-layer arrays."""
    from safetensors.numpy import save as save_tensors  # here: the import sandbox never needs it

    small = {key: value for key, value in record.items() if key not in ARRAY_KEYS}
    tensors = {
        f"{layer}/{key}": np.ascontiguousarray(np.asarray(record[key][index], np.float32))
        for key in ARRAY_KEYS
        for index, layer in enumerate(record["layers"])
    }
    return small, save_tensors(tensors, metadata={"layers": ",".join(record["layers"])})


def join_arrays(small: dict, blob: bytes) -> dict:
    """The whole OOD record again, from `split_arrays`' two parts."""
    from safetensors.numpy import load as load_tensors

    tensors = load_tensors(blob)
    try:
        arrays = {key: [tensors[f"{layer}/{key}"] for layer in small["layers"]] for key in ARRAY_KEYS}
    except KeyError as exc:
        raise ValueError(f"the OOD statistics have no {exc.args[0]!r} array") from exc
    return {**small, **arrays}


def has_arrays(record: dict) -> bool:
    """Whether an OOD record still carries its arrays inline (a whole record, or an old JSON one)."""
    return all(key in record for key in ARRAY_KEYS)


def _rounded(values: np.ndarray) -> list:
    """float32 precision is plenty for the statistics and keeps the stored JSON small."""
    return np.asarray(values, np.float32).tolist()
