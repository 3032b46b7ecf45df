"""airbench's optimiser in Keras: the update rule, units, schedule and frozen variables."""

import keras
import numpy as np
import pytest

from training.optim import AirbenchSGD, WarmupLinearDecay, make_optimizer
from training.recipe import AIRBENCH94


def reference_steps(weights, gradients, lr, momentum, l2, scale):
    """PyTorch's SGD(nesterov=True, weight_decay=l2/scale, lr=lr*scale), written out in NumPy."""
    weights, buffer = np.array(weights, np.float64), np.zeros(len(weights))
    for gradient in gradients:
        g = gradient + l2 / scale * weights
        buffer = momentum * buffer + g
        weights = weights - lr * scale * (g + momentum * buffer)
    return weights


@pytest.mark.parametrize("name, scale", [("kernel", 1.0), ("beta", 64.0)])
def test_update_is_torch_nesterov_with_coupled_l2_and_per_path_scale(name, scale):
    variable = keras.Variable(np.array([1.0, -2.0, 0.5]), name=name)
    optimizer = AirbenchSGD(0.01, momentum=0.85, l2=0.3, lr_scales={"beta": 64.0})
    gradients = [np.array([0.1, 0.2, -0.3]), np.array([-0.05, 0.4, 0.1]), np.array([0.2, -0.1, 0.0])]
    for gradient in gradients:
        optimizer.apply([keras.ops.convert_to_tensor(gradient, "float32")], [variable])
    expected = reference_steps([1.0, -2.0, 0.5], gradients, 0.01, 0.85, 0.3, scale)
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5)


def test_frozen_variable_stops_changing_at_its_step():
    variable = keras.Variable(np.ones(2), name="bias")
    optimizer = AirbenchSGD(0.1, momentum=0.85, l2=0.0, frozen_after={"bias": 2})
    values = []
    for _ in range(4):
        optimizer.apply([keras.ops.ones(2)], [variable])
        values.append(variable.numpy().copy())
    assert not np.allclose(values[0], 1.0) and not np.allclose(values[1], values[0])
    np.testing.assert_array_equal(values[3], values[1])


def airbench_lr(step, total):
    """airbench94's get_lr, copied."""
    warmup_steps = int(total * 0.23)
    if step < warmup_steps:
        frac = step / warmup_steps
        return 0.2 * (1 - frac) + 1.0 * frac
    frac = (step - warmup_steps) / (total - warmup_steps)
    return 1.0 * (1 - frac) + 0.07 * frac


def test_schedule_is_airbenchs_warmup_and_linear_decay():
    schedule = WarmupLinearDecay(2.0, 100)
    for step in (0, 10, 22, 23, 24, 60, 99, 100):
        assert float(schedule(step)) == pytest.approx(2.0 * airbench_lr(step, 100), rel=1e-5)


def test_recipe_units_follow_airbench():
    optimizer = make_optimizer(AIRBENCH94.with_overrides(epochs=2), steps_per_epoch=10)
    gain = 1 + 1 / (1 - 0.85)
    # lr 11.5 per 1024 examples over the Nesterov gain, for a mean loss at batch 1024; step 0 is 0.2x.
    peak = float(optimizer.learning_rate) / 0.2
    assert peak == pytest.approx(11.5 / gain)
    # Every variable decays by wd / gain per step: l2 * lr for the others, (l2 / 64) * (64 lr) for biases.
    assert optimizer.l2 * peak == pytest.approx(0.0153 / gain)
    assert optimizer.lr_scales == {"/beta": 64.0}
    assert optimizer.frozen_after == {"whiten/kernel": 0, "whiten/bias": 30}
