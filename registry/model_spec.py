"""What a model needs beside its weights to be served, and the defaults for a model that does not say.

Flask-free and Keras-free: the registry, train.py, training/calibration_fit.py and the benchmarks all read a
model's settings through `ModelSpec.from_metrics`, so the defaults are written once, here.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

# The default for a 10-way model without class names: the seed's CIFAR-10 order.
# Serving always reads the names stored with each model, never this list.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class ModelSpec:
    """What the predictor needs to know about a model beyond its weights."""

    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]  # height, width, channels
    input_scale: str = "unit"
    output_kind: str = "logits"
    tta: str = "none"

    @property
    def image_size(self) -> tuple[int, int]:
        """Target (width, height) for Pillow."""
        return self.input_shape[1], self.input_shape[0]

    @classmethod
    def from_metrics(
        cls,
        metrics: dict,
        input_shape,
        *,
        class_names=None,
        input_scale: str | None = None,
        output_kind: str | None = None,
        tta: str | None = None,
    ) -> ModelSpec:
        """The spec a model's metrics (as train.py writes metrics.json) describe: each setting is
        the one given here, else the metrics', else the default (CIFAR10_CLASSES, the fields')."""
        given = {"input_scale": input_scale, "output_kind": output_kind, "tta": tta}
        settings = {name: value or metrics.get(name) or SETTING_DEFAULTS[name] for name, value in given.items()}
        names = class_names or metrics.get("class_names") or CIFAR10_CLASSES
        return cls(tuple(names), tuple(int(v) for v in input_shape), **settings)


# input_scale, output_kind and tta with their defaults, read off the fields above.
SETTING_DEFAULTS = {f.name: f.default for f in fields(ModelSpec) if f.default is not MISSING}
