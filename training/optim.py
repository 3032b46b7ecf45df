"""airbench94's optimiser in Keras: Nesterov SGD with coupled L2, per-variable learning rates,
a warm-up then linear-decay schedule. Used for training only; never saved with a model.

airbench states its learning rate and weight decay per 1,024 examples and divided by the
Nesterov step gain 1 + 1/(1 - momentum), for a summed loss. Keras' loss is the batch mean, so
the per-step learning rate is lr * batch/1024 / gain, and the weight decay is coupled (added to
the gradient, so momentum carries it) with a coefficient chosen so that every variable decays by
the same wd * batch/1024 / gain a step, BatchNorm biases included although they learn 64x faster.
"""

from __future__ import annotations

import keras
from keras import ops

from training.recipe import Recipe


class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """airbench's schedule: from 0.2x to 1x over the first 23 % of steps, then down to 0.07x."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.23, start: float = 0.2, end: float = 0.07):
        self.peak = peak
        self.total_steps = total_steps
        self.warmup_steps = max(1, int(total_steps * warmup))
        self.start = start
        self.end = end

    def __call__(self, step):
        step = ops.cast(step, "float32")
        up = ops.minimum(step / self.warmup_steps, 1.0)
        down = ops.clip((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        factor = ops.where(step < self.warmup_steps, self.start + (1 - self.start) * up, 1 - (1 - self.end) * down)
        return self.peak * factor

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps}


class AirbenchSGD(keras.optimizers.Optimizer):
    """PyTorch-style Nesterov SGD (buffer = m * buffer + g; step = lr * (g + m * buffer)) with the
    L2 term added to g, per-variable learning-rate scales and variables frozen after a step.

    `lr_scales` and `frozen_after` map a variable's path suffix (e.g. "/beta", "whiten/bias") to
    a learning-rate multiplier and to the step from which the variable no longer changes.
    """

    def __init__(
        self,
        learning_rate,
        momentum: float,
        l2: float,
        lr_scales: dict[str, float] | None = None,
        frozen_after: dict[str, int] | None = None,
        name: str = "airbench_sgd",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = momentum
        self.l2 = l2
        self.lr_scales = dict(lr_scales or {})
        self.frozen_after = dict(frozen_after or {})

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.buffers = self.add_optimizer_variables(variables, "momentum")
        # Looked up here by path, once: under TensorFlow update_step sees the backend variable,
        # which has no path, so it finds these by the variable's index.
        self.scales = [_lookup(self.lr_scales, v.path, 1.0) for v in variables]
        self.freeze_steps = [_lookup(self.frozen_after, v.path, None) for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        scale = self.scales[index]
        learning_rate = ops.cast(learning_rate, variable.dtype) * scale
        # Coupled decay: dividing by the scale keeps the decay per step equal for every variable.
        gradient = ops.cast(gradient, variable.dtype) + (self.l2 / scale) * variable
        if self.freeze_steps[index] is not None:
            learning_rate = learning_rate * ops.cast(self.iterations < self.freeze_steps[index], variable.dtype)
        buffer = self.buffers[index]
        self.assign(buffer, self.momentum * buffer + gradient)
        self.assign_sub(variable, learning_rate * (gradient + self.momentum * buffer))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(momentum=self.momentum, l2=self.l2, lr_scales=self.lr_scales, frozen_after=self.frozen_after)
        return config


def _lookup(table: dict, path: str, default):
    """The value of the first suffix in `table` that `path` ends with, else `default`."""
    return next((value for suffix, value in table.items() if path.endswith(suffix)), default)


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimiser a recipe names, with its schedule over the whole run."""
    if recipe.optimizer == "adam":
        return keras.optimizers.Adam(recipe.learning_rate)
    gain = 1 + 1 / (1 - recipe.momentum)
    per_batch = recipe.batch_size / 1024
    learning_rate = recipe.learning_rate * per_batch / gain
    decay_per_step = recipe.weight_decay * per_batch / gain
    return AirbenchSGD(
        WarmupLinearDecay(learning_rate, steps_per_epoch * recipe.epochs),
        momentum=recipe.momentum,
        l2=decay_per_step / learning_rate,
        lr_scales={"/beta": recipe.bias_scaler},
        frozen_after={"whiten/kernel": 0, "whiten/bias": recipe.whiten_bias_epochs * steps_per_epoch},
    )
