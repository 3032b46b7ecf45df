"""The heat maps' colours are matplotlib's "jet", byte for byte, without a worker importing matplotlib."""

from __future__ import annotations

import numpy as np

from inference import heatmap


def test_the_colour_table_is_matplotlibs_jet():
    from matplotlib import colormaps

    rng = np.random.default_rng(0)
    values = np.concatenate([np.linspace(0, 1, 100_001, dtype=np.float32), rng.random(10_000, dtype=np.float32)])
    values = np.concatenate([values, np.array([0.0, 1.0, 255 / 256, 1 - 1e-7], np.float32)]).reshape(-1, 7)
    np.testing.assert_array_equal(heatmap.colour(values), colormaps["jet"](values, bytes=True)[..., :3])
