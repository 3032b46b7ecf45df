"""Training recipes: every hyper-parameter of a run in one value, with the two shipped presets.

`AIRBENCH94` states airbench94's hyper-parameters in its own decoupled units (learning rate and
weight decay per 1,024 examples, see training/optim.py), with 32 epochs instead of 9.9 to use the
hour. `STRONG`, the shipped recipe, adds 8x8 cutout: the one change that beat it on the 45k/5k
validation split over 3 seeds (benchmarks/results/recipe_airbench.jsonl, README).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Recipe:
    """How to train: optimiser, schedule, augmentation, precision and test-time augmentation."""

    optimizer: str  # "airbench-sgd" (Nesterov SGD, coupled L2, BN biases faster) or "adam"
    epochs: int
    batch_size: int
    learning_rate: float  # airbench-sgd: per 1,024 examples, momentum-decoupled; adam: as is
    weight_decay: float = 0.0  # airbench-sgd: per 1,024 examples, decoupled from the learning rate
    momentum: float = 0.85
    bias_scaler: float = 64.0  # BatchNorm biases learn this much faster (not decay faster)
    label_smoothing: float = 0.0
    whiten_bias_epochs: int = 0  # epochs the whitening bias trains before it is frozen
    lookahead: bool = False
    flip: str = "none"  # "none", "random" (each image, each epoch) or "alternating" (airbench)
    translate: int = 0  # random translation in pixels, reflect padding
    cutout: int = 0  # side of a square set to the mean colour (0: off)
    precision: str = "float32"
    jit_compile: bool = False  # XLA-compile the training step (faster where bfloat16 is emulated)
    tta: str = "none"  # the predictor's test-time augmentation for this model

    def with_overrides(self, **overrides) -> Recipe:
        """A copy with the given fields changed (None leaves a field as it is)."""
        return replace(self, **{key: value for key, value in overrides.items() if value is not None})

    def as_dict(self) -> dict:
        """Every field, for metrics.json and result lines."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


# The seed document's training: Adam, sparse cross-entropy from logits, batch 32, 50 epochs.
ADAM_SEED = Recipe(optimizer="adam", epochs=50, batch_size=32, learning_rate=0.001)

AIRBENCH94 = Recipe(
    optimizer="airbench-sgd",
    epochs=32,
    batch_size=1024,
    learning_rate=11.5,
    weight_decay=0.0153,
    momentum=0.85,
    bias_scaler=64.0,
    label_smoothing=0.2,
    whiten_bias_epochs=3,
    lookahead=True,
    flip="alternating",
    translate=2,
    precision="mixed_bfloat16",
    tta="flip-translate",
)

STRONG = replace(AIRBENCH94, cutout=8)
