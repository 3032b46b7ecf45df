"""airbench's Lookahead: every 5 steps the weights move to an average of themselves (slow weights).

Unlike Keras' `use_ema`, it averages every float variable, BatchNorm moving statistics included,
and writes the average back into the model each time, so training continues from it; the run
ends on the slow weights. Training-only: it keeps NumPy copies, nothing goes into the model file.
"""

from __future__ import annotations

import keras
import numpy as np

EVERY = 5


class Lookahead:
    """Slow copies of a model's float variables, updated with airbench's decay schedule."""

    def __init__(self, model: keras.Model, total_steps: int):
        self.variables = [v for v in model.variables if "float" in str(v.dtype)]
        self.slow = [np.array(v.numpy(), np.float32) for v in self.variables]
        self.total_steps = total_steps

    def decay(self, step: int) -> float:
        """Weight kept by the slow copy: small early (the slow copy follows), 0.95**5 at the end."""
        return 0.95**5 * (step / self.total_steps) ** 3

    def after_step(self, step: int) -> None:
        """Call after each optimiser step (1-based count); acts every 5 steps."""
        if step % EVERY:
            return
        decay = self.decay(step)
        for variable, slow in zip(self.variables, self.slow, strict=True):
            slow += (1 - decay) * (np.asarray(variable.numpy(), np.float32) - slow)
            variable.assign(slow)

    def finish(self) -> None:
        """End on the slow weights (airbench's final update with decay 1)."""
        for variable, slow in zip(self.variables, self.slow, strict=True):
            variable.assign(slow)
