"""The lean serving engine: a Keras model converted once to LiteRT (TensorFlow Lite), run without
TensorFlow.

`convert` (import time, where TensorFlow is loaded anyway) turns a Keras model into one LiteRT
file whose outputs are everything a request needs in one pass: the model's output, the pooled
features of the OOD layers (as `ood.with_pooled_features` computes them) and, when the head allows
it, the feature map Grad-CAM explains. It checks the converted outputs against Keras on a probe
batch and refuses a conversion that differs. `LiteEngine` (the web worker) runs that file with
`ai_edge_litert` and XNNPACK and never imports TensorFlow.

Grad-CAM without TensorFlow: when the head is a global max or average pooling, or a flatten, of
the explained feature map followed by a linear dense layer (and constant rescalings, as the strong
network's temperature), the gradient of a class score with respect to the map is known in closed
form: the class's dense weights, at each channel's argmax cell for a max pool (split between tied
cells, as TensorFlow's gradient of a max is), spread evenly over the cells for an average pool, or
the class's dense weights laid out as the map for a flatten. The head's weights travel in the
metadata; any other head has no explanation here (`NoExplanation`).

`convert(..., quantize=True)` writes dynamic-range int8 instead of fp32 (`flask models import
--engine int8`). It cannot answer as Keras does to 1e-4, so its check is its own (`verify_quantised`:
logits within INT8_LOGIT_TOLERANCE of Keras' scale, outputs finite, top-1 agreement recorded), and it
is served only with a calibration fitted on its own outputs (`check_calibration_fits`).

Flask-free; TensorFlow and Keras are imported only inside the conversion functions.
"""

from __future__ import annotations

import contextlib
import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from inference.explain import WEIGHTINGS, NoExplanation, Unexplainable
from predictor import scale_pixels

# fp32 reproduces Keras to float rounding; dynamic-range int8 (weights stored as int8, activations
# quantised on the fly) is smaller and faster but changes outputs, so calibration and OOD statistics
# must be refitted on its outputs (issue 21).
ENGINE_FORMATS = {False: "litert-fp32", True: "litert-int8-dynamic"}
INT8_FORMAT = ENGINE_FORMATS[True]
PROBE_TOLERANCE = 1e-4  # the largest difference from Keras an fp32 conversion may show on the probe batch
# An int8 conversion's logits may differ from Keras' by this share of their largest magnitude on
# the probe batch (at least 1). No separate top-1 rule: a class can only change where Keras' top-two
# margin is under twice the logit difference, so the bound already limits which answers may flip;
# the probe's top-1 agreement is recorded beside it. The shipped model measured 0.073 against its
# bound of 0.48 (docs/lite-engine.md, "Quantised").
INT8_LOGIT_TOLERANCE = 0.2
PROBE_SIZE = 8


class ConversionError(RuntimeError):
    """The converted model does not answer as the Keras model does; the message says by how much."""


@dataclass(frozen=True)
class Converted:
    """A converted model: the LiteRT file and what the engine needs beside it (JSON-serialisable)."""

    tflite: bytes
    metadata: dict


# --- Conversion (TensorFlow) -------------------------------------------------------------------


def _layer_kinds():
    """The Keras layer classes a head may be made of, by the role they play in the gradient."""
    import keras

    layers = keras.layers
    pools = {layers.GlobalMaxPooling2D: "max", layers.GlobalAveragePooling2D: "average", layers.Flatten: "flatten"}
    identities = (layers.Dropout, layers.GaussianNoise, layers.GaussianDropout, layers.Activation)
    return pools, layers.Dense, layers.Rescaling, identities


def _is_linear(layer) -> bool:
    import keras

    return getattr(layer, "activation", keras.activations.linear) is keras.activations.linear


def head_of(model, explain_layer: str | None = None) -> dict:
    """The explained layer and the pooling (or flatten) + dense head that reads it, as metadata:
    {"layer", "pooling", "grid", "kernel" (features x classes), "bias" (classes)}, with any constant
    rescaling after the dense layer folded into kernel and bias. NoExplanation for any other head."""
    from inference.explain import find_layer

    pools, dense_class, rescaling_class, identities = _layer_kinds()
    pool_at = [i for i, layer in enumerate(model.layers) if type(layer) in pools]
    if len(pool_at) != 1 or pool_at[0] == 0:
        raise NoExplanation(
            "No explanation for this model: its head is not one global pooling (or flatten) of a feature map "
            "and a dense layer."
        )
    feature_layer = model.layers[pool_at[0] - 1]
    pooling = pools[type(model.layers[pool_at[0]])]
    explained = find_layer(model, explain_layer).name
    if explained != feature_layer.name:
        raise NoExplanation(f"No explanation for this model here: its pooling does not read layer {explained!r}.")
    # The head as an affine map of the pooled features: rescalings before the dense layer act on
    # the features, those after it on the scores.
    kernel, bias = None, np.zeros(1)
    pre_scale, pre_offset = np.ones(1), np.zeros(1)
    for layer in model.layers[pool_at[0] + 1 :]:
        if isinstance(layer, dense_class) and kernel is None and _is_linear(layer):
            weights = [np.asarray(w, np.float64) for w in layer.get_weights()]
            kernel = weights[0] * pre_scale.reshape(-1, 1)
            bias = np.broadcast_to(pre_offset, weights[0].shape[:1]) @ weights[0]
            bias = bias + (weights[1] if len(weights) > 1 else 0.0)
        elif isinstance(layer, rescaling_class):
            scale, offset = np.asarray(layer.scale, np.float64), np.asarray(layer.offset, np.float64)
            if kernel is None:
                pre_scale, pre_offset = pre_scale * scale, pre_offset * scale + offset
            else:
                kernel, bias = kernel * scale, bias * scale + offset
        elif not (isinstance(layer, identities) and _is_linear(layer)):
            raise NoExplanation(
                f"No explanation for this model here: its head has a {type(layer).__name__} layer ({layer.name!r})."
            )
    if kernel is None:
        raise NoExplanation("No explanation for this model: its head has no dense layer after the pooling.")
    return {
        "layer": feature_layer.name,
        "pooling": pooling,
        "grid": list(feature_layer.output.shape[1:3]),
        "kernel": kernel.astype(np.float32).tolist(),
        "bias": bias.astype(np.float32).tolist(),
    }


def _served_model(model, feature_layers: Sequence[str], explain_layer: str | None):
    """A Keras model answering [output, *pooled features, feature map] in one pass."""
    import keras

    from inference.ood import with_pooled_features

    served = with_pooled_features(model, tuple(feature_layers))
    if explain_layer is None:
        return served
    return keras.Model(served.inputs, [*served.outputs, model.get_layer(explain_layer).output])


def _tflite_bytes(served, quantize: bool = False) -> bytes:
    """The LiteRT flatbuffer of a Keras model, fp32 (or dynamic-range int8 weights with
    `quantize`), batch dimension left dynamic."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(served)
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic range
    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints the SavedModel it exports on the way
        return converter.convert()


def default_probe(input_shape: Sequence[int], size: int = PROBE_SIZE, seed: int = 0) -> np.ndarray:
    """A probe batch of uniform [0, 1] images, the same every time."""
    return np.random.default_rng(seed).random((size, *input_shape), dtype=np.float32)


def pooled(feature_map: np.ndarray, pooling: str) -> np.ndarray:
    """What the head's dense layer reads of an N x h x w x channels feature map."""
    if pooling == "flatten":
        return feature_map.reshape(len(feature_map), -1)
    return feature_map.max(axis=(1, 2)) if pooling == "max" else feature_map.mean(axis=(1, 2))


def _check_head(head: dict, logits: np.ndarray, feature_map: np.ndarray, tolerance: float) -> None:
    """The closed-form head must give the model's own output from the feature map, or the
    gradient taken from it would be of some other function."""
    recomputed = pooled(feature_map, head["pooling"]).astype(np.float64) @ np.asarray(
        head["kernel"], np.float64
    ) + np.asarray(head["bias"])
    difference = float(np.abs(recomputed - logits).max())
    if not difference <= tolerance * max(1.0, float(np.abs(logits).max())):
        raise NoExplanation(
            f"No explanation for this model here: its head does not reproduce its output (max abs {difference:.2e})."
        )


def convert(
    model,
    feature_layers: Sequence[str],
    explain_layer: str | None = None,
    probe: np.ndarray | None = None,
    quantize: bool = False,
) -> Converted:
    """Convert a Keras model for `LiteEngine`: outputs its output, the channel means of each of
    `feature_layers` and, when Grad-CAM can be computed from the head, the explained feature map
    (`explain_layer`: the model's metadata's explain_layer, else the last feature map). The
    conversion is checked on `probe` (float32 model input; `default_probe` when None): every output
    within PROBE_TOLERANCE of Keras, else ConversionError. `quantize`: dynamic-range int8, checked
    instead by `verify_quantised`."""
    try:
        head = head_of(model, explain_layer)
        explain = {"head": head}
    except NoExplanation as exc:
        head, explain = None, {"unavailable": exc.message}
    except Exception as exc:  # an unusual graph: served, only unexplained (as explain.explainer_for does)
        head, explain = None, {"unavailable": f"No explanation for this model here: its head was not read ({exc})."}
    served = _served_model(model, feature_layers, head and head["layer"])
    probe = default_probe(model.input_shape[1:]) if probe is None else np.asarray(probe, np.float32)
    answered = served([probe], training=False)
    answered = answered if isinstance(answered, list | tuple) else [answered]  # a model with one output
    expected = [np.asarray(output, np.float32) for output in answered]
    if head is not None:
        try:
            _check_head(head, expected[0], expected[-1], PROBE_TOLERANCE)  # Keras against the closed form
        except NoExplanation as exc:  # served without the map, and without explanations
            head, explain = None, {"unavailable": exc.message}
            served = _served_model(model, feature_layers, None)
            expected = expected[:-1]
    tflite = _tflite_bytes(served, quantize)
    metadata = {
        "format": ENGINE_FORMATS[quantize],
        "input_shape": list(model.input_shape[1:]),
        "feature_layers": list(feature_layers),
        "explain": explain,
    }
    if quantize:
        metadata.update(verify_quantised(tflite, metadata, probe, expected))
    else:
        metadata["probe_max_abs_diff"] = verify(tflite, metadata, probe, expected, PROBE_TOLERANCE)
    return Converted(tflite, metadata)


def verify(
    tflite: bytes, metadata: dict, probe: np.ndarray, expected: Sequence[np.ndarray], tolerance: float
) -> list[float]:
    """Run the converted model on `probe` and compare each output with `expected` (Keras'):
    the largest absolute difference per output, or ConversionError past `tolerance`."""
    differences = _differences(LiteEngine(tflite, metadata, num_threads=1).outputs(probe), expected)
    if not max(differences) <= tolerance:  # NaN fails too
        raise ConversionError(
            f"the converted model differs from Keras on the probe batch: max abs {max(differences):.3g} "
            f"(per output {[f'{d:.2g}' for d in differences]}), tolerance {tolerance:g}"
        )
    return differences


def verify_quantised(tflite: bytes, metadata: dict, probe: np.ndarray, expected: Sequence[np.ndarray]) -> dict:
    """An int8 conversion's check on `probe`: every output finite and shaped as Keras', the model's
    output within INT8_LOGIT_TOLERANCE x max(1, its largest magnitude in Keras), else ConversionError;
    what it measured (metadata: per-output differences, the logit bound, top-1 agreement)."""
    outputs = LiteEngine(tflite, metadata, num_threads=1).outputs(probe)
    differences = _differences(outputs, expected)
    bound = INT8_LOGIT_TOLERANCE * max(1.0, float(np.abs(expected[0]).max()))
    if not (np.isfinite(differences).all() and differences[0] <= bound):
        raise ConversionError(
            f"the int8 conversion differs from Keras on the probe batch: logits max abs {differences[0]:.3g}, "
            f"allowed {bound:.3g} ({INT8_LOGIT_TOLERANCE:g} of their scale); "
            f"per output {[f'{d:.2g}' for d in differences]}"
        )
    agreement = float((outputs[0].argmax(axis=1) == expected[0].argmax(axis=1)).mean())
    return {"probe_max_abs_diff": differences, "probe_logit_bound": bound, "probe_top1_agreement": agreement}


def _differences(outputs: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> list[float]:
    """The largest absolute difference of each converted output from Keras' (ConversionError when
    their number or shapes differ)."""
    if len(outputs) != len(expected):
        raise ConversionError(f"the converted model has {len(outputs)} outputs, Keras {len(expected)}")
    differences = []
    for index, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        if got.shape != want.shape:
            raise ConversionError(f"output {index}: shape {got.shape} converted, {want.shape} in Keras")
        differences.append(float(np.abs(got - want).max()))
    return differences


def check_calibration_fits(metadata: dict, record: dict | None) -> None:
    """Refuse (ValueError) to serve a conversion with a calibration fitted on other outputs: an int8
    conversion needs one fitted on its own (`flask calibrate`, record["fitted_on"] the format), an
    fp32 one a calibration fitted on Keras or fp32 (which answer alike). No calibration fits both."""
    if record is None:
        return
    fitted_on = record.get("fitted_on", "keras")
    served = metadata.get("format")
    if (served == INT8_FORMAT) != (fitted_on == INT8_FORMAT):
        raise ValueError(
            f"its served conversion is {served} but its calibration was fitted on {fitted_on} outputs: "
            "refit it on the served outputs with `flask calibrate ID --data DIR` (its temperature, thresholds "
            "and OOD statistics would not match the scores served)"
        )


# --- Serving (no TensorFlow) -------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOutputs:
    """One batch's answers: the model's output (N x classes), each OOD layer's pooled features
    (N x channels) and the explained feature map (N x h x w x channels, None without a head)."""

    logits: np.ndarray
    features: list[np.ndarray]
    feature_map: np.ndarray | None


class LiteEngine:
    """A converted model run by the LiteRT interpreter (XNNPACK); safe to share between threads.

    One interpreter behind a lock, not one per thread: measured on 2 cores both give the same calls/s
    and each interpreter holds its own packed copy of the weights. Its XNNPACK pool uses
    `num_threads`. The batch dimension is dynamic: a new batch size resizes the interpreter, which
    measured cheaper than padding to fixed batch buckets.
    """

    def __init__(self, tflite: bytes, metadata: dict, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        if metadata.get("format") not in ENGINE_FORMATS.values():
            raise ValueError(f"not a LiteRT model of this engine: format {metadata.get('format')!r}")
        self.metadata = metadata
        self.input_shape = tuple(metadata["input_shape"])
        self.feature_layers = tuple(metadata["feature_layers"])  # the OOD layers whose features it answers
        self.head = metadata["explain"].get("head")
        self._lock = threading.Lock()
        self._interpreter = Interpreter(model_content=tflite, num_threads=num_threads)
        self._runner = self._interpreter.get_signature_runner()
        (self._input_name,) = self._runner.get_input_details()
        # The converter names the signature's outputs output_0, output_1... in Keras' order.
        self._output_names = sorted(self._runner.get_output_details(), key=lambda name: int(name.rsplit("_", 1)[1]))
        wanted = 1 + len(self.feature_layers) + (self.head is not None)
        if len(self._output_names) != wanted:
            raise ValueError(f"the model file has {len(self._output_names)} outputs, its metadata says {wanted}")

    @property
    def explainable(self) -> bool:
        return self.head is not None

    def outputs(self, batch: np.ndarray) -> list[np.ndarray]:
        """The raw outputs for a float32 batch N x H x W x C (model input, already scaled):
        [output, *pooled features, feature map if explainable], as the converted Keras model."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape or len(batch) == 0:
            raise ValueError(f"expected a non-empty batch of shape (N, {', '.join(map(str, self.input_shape))})")
        with self._lock:  # an interpreter is not thread-safe; results are copies
            answers = self._runner(**{self._input_name: batch})
        return [answers[name] for name in self._output_names]

    def forward(self, feature_layers: Sequence[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """A function of a float32 batch giving [output, *pooled features of `feature_layers`]
        (what `predictor.Predictor` calls); a ValueError when the file lacks one of the layers."""
        missing = [name for name in feature_layers if name not in self.feature_layers]
        if missing:
            raise ValueError(
                f"the converted model has no pooled features of layer(s) {', '.join(missing)}: "
                "convert it again with `flask models upgrade-files`"
            )
        picks = [1 + self.feature_layers.index(name) for name in feature_layers]

        def call(batch: np.ndarray) -> list[np.ndarray]:
            outputs = self.outputs(batch)
            return [outputs[0], *(outputs[index] for index in picks)]

        return call

    def penultimate_forward(self) -> Callable[[np.ndarray], list[np.ndarray]]:
        """A function of a float32 batch giving [output, what the head's dense layer reads]: the
        explained feature map pooled (or flattened) as the head does; for a head without that
        closed form, the deepest block's channel means (the conversion's `penultimate_layer`); for a
        model without convolutional blocks, its output."""
        if self.head is None:
            layer = self.metadata.get("penultimate_layer")
            if layer is None:
                only_output = self.forward(())
                return lambda batch: only_output(batch) * 2
            return self.forward((layer,))

        def call(batch: np.ndarray) -> list[np.ndarray]:
            answers = self.run(batch)
            return [answers.logits, pooled(answers.feature_map, self.head["pooling"])]

        return call

    def run(self, batch: np.ndarray) -> EngineOutputs:
        """The outputs of a float32 batch, by role."""
        outputs = self.outputs(batch)
        feature_map = outputs.pop() if self.explainable else None
        return EngineOutputs(outputs[0], outputs[1:], feature_map)

    def explain(self, batch: np.ndarray, class_indices: Sequence[int], weighting: str = "cell") -> np.ndarray:
        """Grad-CAM heat maps as explain.Explainer draws them (N x grid h x grid w, floats in [0, 1],
        1 at each map's peak) for a float32 batch and one class index per image, from the feature
        map and the head's closed-form gradient. NoExplanation when the head has none."""
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}")
        if self.head is None:
            raise NoExplanation(self.metadata["explain"]["unavailable"])
        feature_map = self.run(batch).feature_map.astype(np.float64)
        return grad_cam(feature_map, self.head, np.asarray(class_indices), weighting)


def head_gradient(feature_map: np.ndarray, head: dict, class_indices: np.ndarray) -> np.ndarray:
    """d(class score)/d(feature map) for a global pooling (or flatten) + dense head, N x h x w x channels."""
    kernel = np.asarray(head["kernel"], np.float64).T[class_indices]  # N x features
    if head["pooling"] == "flatten":  # the score is linear in every cell: its weights are the gradient
        return kernel.reshape(feature_map.shape)
    class_weights = kernel[:, None, None, :]  # N x 1 x 1 x C
    if head["pooling"] == "average":
        cells = feature_map.shape[1] * feature_map.shape[2]
        return np.broadcast_to(class_weights / cells, feature_map.shape)
    # A max pool passes the gradient to the cell each channel's maximum came from; TensorFlow splits
    # it evenly between tied cells, and so does this.
    argmax = feature_map == feature_map.max(axis=(1, 2), keepdims=True)
    return class_weights * argmax / argmax.sum(axis=(1, 2), keepdims=True)


def grad_cam(feature_map: np.ndarray, head: dict, class_indices: np.ndarray, weighting: str = "cell") -> np.ndarray:
    """explain.Explainer's map from a feature map and its head's gradient: LayerCAM ("cell": each
    cell by its own positive gradient) or Grad-CAM ("channel": by the channel's mean gradient)."""
    gradient = head_gradient(feature_map, head, class_indices)
    weights = gradient.mean(axis=(1, 2), keepdims=True) if weighting == "channel" else np.maximum(gradient, 0.0)
    cam = np.maximum((weights * feature_map).sum(axis=-1), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    grids = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
    return np.nan_to_num(grids, nan=0.0, posinf=0.0, neginf=0.0).clip(0.0, 1.0).astype(np.float32)


class LiteExplainer:
    """explain.Explainer's interface over a LiteEngine: maps for a uint8 batch, one class each."""

    def __init__(self, engine: LiteEngine, input_scale: str):
        self.engine = engine
        self.input_scale = input_scale
        self.layer_name: str = engine.head["layer"]
        self.grid_shape: tuple[int, int] = tuple(engine.head["grid"])

    def explain(self, images: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
        """Heat maps of the images as sent (no test-time views), as explain.Explainer draws them."""
        return self.engine.explain(scale_pixels(images, self.input_scale), class_indices)


def explainer_of(engine: LiteEngine, input_scale: str) -> LiteExplainer | Unexplainable:
    """The engine's explainer, or an Unexplainable giving the reason recorded at conversion."""
    if not engine.explainable:
        return Unexplainable(engine.metadata["explain"]["unavailable"])
    return LiteExplainer(engine, input_scale)
