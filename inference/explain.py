"""Grad-CAM: where in the image a convolutional model looked when it scored a class.

The gradient of the class score with respect to the last convolutional feature map weighs that
map; the weighted sum over the channels, negative parts dropped, is the heat map (Selvaraju et
al., 2017). By default each cell of each channel is weighed by its own positive gradient
(LayerCAM, Jiang et al., 2021) rather than by the channel's mean gradient: behind a global max
pool, as in the shipped network, only the cell each channel's maximum came from reaches the
score, and the mean spreads that credit over the whole map (benchmarks/pointing.py: 95.8 %
against 67.8 % on training images). The layer is found automatically (the last layer with
a 4-D output, that is the one the head reads) unless the model's metadata names one
(`metrics["explain_layer"]`), which settles models where the last one is not the right one.

Flask-free: the web layer and the CLI call it through `serving`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from app_errors import AppError
from predictor import ModelSpec, scale_pixels

log = logging.getLogger(__name__)
# How the gradient weighs the feature map: "channel" is Grad-CAM (each channel by its gradient's
# mean over the map); "cell" is LayerCAM (Jiang et al., 2021: each cell of each channel by its own
# positive gradient), which for a max-pooled head credits only the cells the head actually read.
WEIGHTINGS = ("channel", "cell")


class NoExplanation(AppError):
    """No map can be drawn: the model cannot be explained with Grad-CAM (`no_explanation`), or the
    class asked for is not one of its classes (`unknown_class`); the message says why."""

    code = "no_explanation"


def _is_feature_map(layer) -> bool:
    """A layer whose single output is image-shaped (batch, height, width, channels)."""
    import keras

    if isinstance(layer, keras.layers.InputLayer):
        return False
    try:
        return len(layer.output.shape) == 4
    except (AttributeError, ValueError):  # a layer shared between calls has no single output
        return False


def find_layer(model, name: str | None = None):
    """The layer to explain: the one named, else the last layer with a 4-D output."""
    if name:
        try:
            layer = model.get_layer(name)
        except ValueError as exc:
            raise NoExplanation(
                f"No explanation for this model: its metadata names layer {name!r}, which it lacks."
            ) from exc
        if not _is_feature_map(layer):
            raise NoExplanation(f"No explanation for this model: layer {name!r} does not output a feature map.")
        return layer
    candidates = [layer for layer in model.layers if _is_feature_map(layer)]
    if not candidates:
        raise NoExplanation("No explanation for this model: it has no convolutional layer to look into.")
    return candidates[-1]


def _features_and_output(model, layer):
    """A model answering (the layer's feature map, the model's output) in one pass."""
    import keras

    if isinstance(model, keras.Sequential):
        # A Sequential loaded from a file can keep its layers' first outputs apart from the graph
        # of `model.outputs`, which leaves the gradient empty: chain the layers afresh instead.
        inputs = x = keras.Input(model.input_shape[1:])
        for each in model.layers:
            x = each(x)
            if each is layer:
                features = x
        return keras.Model(inputs, [features, x])
    return keras.Model(model.inputs, [layer.output, model.outputs[0]])


class Explainer:
    """Grad-CAM for one loaded model: the (feature map, output) model is built once here and the
    gradient is computed in one compiled function; safe to share between threads."""

    def __init__(self, model, spec: ModelSpec, layer_name: str | None = None, weighting: str = "cell"):
        import tensorflow as tf

        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}")

        layer = find_layer(model, layer_name)
        self.layer_name: str = layer.name
        self.weighting = weighting
        self.spec = spec
        self.grid_shape: tuple[int, int] = tuple(layer.output.shape[1:3])
        features_and_output = _features_and_output(model, layer)
        log_scores = spec.output_kind == "probabilities"

        def grad_cam(batch, class_indices):
            with tf.GradientTape() as tape:
                features, outputs = features_and_output(batch, training=False)
                features = tf.cast(features, tf.float32)  # mixed-precision models answer in bfloat16
                scores = tf.gather(tf.cast(outputs, tf.float32), class_indices, batch_dims=1)
                if log_scores:  # a softmax output saturates; its log keeps a usable gradient
                    scores = tf.math.log(tf.maximum(scores, 1e-12))
            gradients = tape.gradient(scores, features)
            if weighting == "channel":
                weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
            else:
                weights = tf.nn.relu(gradients)
            cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
            return tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))

        height, width, channels = spec.input_shape
        self._grad_cam = tf.function(
            grad_cam,
            input_signature=[
                tf.TensorSpec([None, height, width, channels], tf.float32),
                tf.TensorSpec([None], tf.int32),
            ],
        )

    def warm_up(self) -> None:
        """Trace the function once so no request pays for it."""
        self.explain(np.zeros((1, *self.spec.input_shape), np.uint8), [0])

    def explain(self, images: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
        """Heat maps (N x grid height x grid width, floats in [0, 1], 1 at each map's peak) for a
        uint8 batch and one class index per image. Test-time augmentation is not applied: the
        map is of the image as it was sent, not of its mirror."""
        batch = scale_pixels(images, self.spec.input_scale)
        grids = self._grad_cam(batch, np.asarray(class_indices, dtype=np.int32)).numpy()
        return np.nan_to_num(grids, nan=0.0, posinf=0.0, neginf=0.0).clip(0.0, 1.0)


class Unexplainable:
    """Stands in for an Explainer of a model Grad-CAM cannot explain; says why when asked."""

    layer_name = None

    def __init__(self, reason: str):
        self.reason = reason

    def explain(self, images: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
        raise NoExplanation(self.reason)


def explainer_for(model, spec: ModelSpec, layer_name: str | None = None) -> Explainer | Unexplainable:
    """A warmed-up Explainer for the model, or an Unexplainable that gives the reason there is none.
    A model Grad-CAM cannot trace is still served: only its maps are missing."""
    try:
        explainer = Explainer(model, spec, layer_name)
        explainer.warm_up()
    except NoExplanation as exc:
        return Unexplainable(exc.message)
    except Exception as exc:  # an unusual graph TensorFlow cannot differentiate: serve it unexplained
        log.warning("Grad-CAM is not available for this model: %s", exc)
        return Unexplainable(
            "No explanation for this model: its feature map cannot be traced to its output"
            " (name a layer in its metadata as explain_layer)."
        )
    return explainer
