"""The LiteRT engine: a converted model answers as Keras does (output, OOD features, Grad-CAM maps),
a conversion that differs is refused, threads share an engine safely, and serving never imports
TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import build_seed_like_model

from inference import lite_engine
from inference.explain import Explainer, NoExplanation
from inference.ood import default_layers, with_pooled_features
from predictor import ModelSpec, scale_pixels

ROOT = Path(__file__).resolve().parent.parent
SPEC = ModelSpec(class_names=tuple(str(i) for i in range(10)), input_shape=(32, 32, 3))


def build_tiny_strong():
    """The strong architecture (airbench94's network: max-pooled head, dense, temperature) at small widths."""
    from training.architectures import build_strong

    return build_strong((32, 32, 3), 10, widths=(8, 16, 16))


def build_pooled_model(pooling: str):
    """A tiny CNN with a global pooling + dense head, rescalings on both sides of the dense layer."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(5)
    inputs = keras.Input(shape=(32, 32, 3))
    x = layers.Conv2D(6, 3, strides=2, activation="relu")(inputs)
    x = layers.Conv2D(8, 3, strides=2, activation="gelu", name="features")(x)
    x = (layers.GlobalMaxPooling2D() if pooling == "max" else layers.GlobalAveragePooling2D())(x)
    x = layers.Rescaling(0.5, offset=0.1)(x)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(10)(x)
    return keras.Model(inputs, layers.Rescaling(1 / 3)(x))


def keras_outputs(model, layers, batch):
    outputs = with_pooled_features(model, layers)([batch], training=False)
    return [np.asarray(o) for o in (outputs if isinstance(outputs, list | tuple) else [outputs])]


def images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def strong():
    model = build_tiny_strong()
    layers = default_layers(model)
    return model, layers, lite_engine.convert(model, layers)


def assert_matches_keras(model, layers, converted, batch_sizes=(5, 1, 3)):
    engine = lite_engine.LiteEngine(converted.tflite, converted.metadata, num_threads=2)
    assert engine.feature_layers == tuple(layers)
    for size in batch_sizes:  # a new batch size resizes the interpreter each time
        batch = scale_pixels(images(size, seed=size), "unit")
        got = engine.run(batch)
        want = keras_outputs(model, layers, batch)
        assert len(got.features) == len(layers)
        for mine, theirs in zip([got.logits, *got.features], want, strict=True):
            assert mine.shape == theirs.shape
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-4)
    return engine


@pytest.mark.parametrize("weighting", ["cell", "channel"])
def test_seed_like_model_with_a_flatten_head_matches_keras_and_tensorflow_maps(weighting):
    model = build_seed_like_model()
    layers = default_layers(model)
    converted = lite_engine.convert(model, layers)
    assert max(converted.metadata["probe_max_abs_diff"]) <= 1e-4
    head = converted.metadata["explain"]["head"]
    assert (head["pooling"], head["grid"]) == ("flatten", [15, 15])
    assert_matches_keras(model, layers, converted)
    assert_same_maps(model, converted, weighting)


def test_a_model_without_a_feature_map_before_its_head_has_no_explanation():
    import keras
    from keras import layers

    model = keras.Sequential([keras.Input(shape=(32, 32, 3)), layers.Flatten(), layers.Dense(10)])
    converted = lite_engine.convert(model, ())
    assert "not one global pooling (or flatten) of a feature map" in converted.metadata["explain"]["unavailable"]
    engine = assert_matches_keras(model, (), converted, batch_sizes=(2,))
    assert engine.run(scale_pixels(images(2), "unit")).feature_map is None
    with pytest.raises(NoExplanation, match="not one global pooling"):
        engine.explain(scale_pixels(images(1), "unit"), [0])


def test_strong_model_matches_keras_and_metadata_is_json(strong):
    model, layers, converted = strong
    assert_matches_keras(model, layers, converted)
    head = converted.metadata["explain"]["head"]
    assert (head["layer"], head["pooling"], head["grid"]) == ("gelu3b", "max", [3, 3])
    # The temperature (Rescaling 1/9) is folded into the kernel.
    kernel = model.get_layer("logits").get_weights()[0] / 9
    np.testing.assert_allclose(head["kernel"], kernel, rtol=1e-6)
    assert json.loads(json.dumps(converted.metadata)) == converted.metadata


def assert_same_maps(model, converted, weighting="cell"):
    engine = lite_engine.LiteEngine(converted.tflite, converted.metadata)
    batch = images(6, seed=9)
    classes = [0, 3, 9, 1, 1, 7]
    want = Explainer(model, SPEC, weighting=weighting).explain(batch, classes)
    got = engine.explain(scale_pixels(batch, "unit"), classes, weighting)
    assert got.shape == want.shape
    assert (want.max(axis=(1, 2)) > 0).sum() >= len(want) - 1  # maps worth comparing: not all zero
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_grad_cam_of_the_strong_network_matches_tensorflow(strong):
    model, _, converted = strong
    assert_same_maps(model, converted)


@pytest.mark.parametrize("pooling", ["max", "average"])
@pytest.mark.parametrize("weighting", ["cell", "channel"])
def test_grad_cam_of_pooled_heads_matches_tensorflow(pooling, weighting):
    model = build_pooled_model(pooling)
    converted = lite_engine.convert(model, ())
    assert converted.metadata["explain"]["head"]["pooling"] == pooling
    assert_same_maps(model, converted, weighting)


def test_a_head_with_a_nonlinear_dense_layer_has_no_explanation():
    import keras
    from keras import layers

    inputs = keras.Input(shape=(32, 32, 3))
    x = layers.GlobalMaxPooling2D()(layers.Conv2D(4, 3, name="features")(inputs))
    model = keras.Model(inputs, layers.Dense(10, activation="softmax")(layers.Dense(8, activation="relu")(x)))
    converted = lite_engine.convert(model, ("features",))
    assert "Dense" in converted.metadata["explain"]["unavailable"]
    assert_matches_keras(model, ("features",), converted, batch_sizes=(2,))


def test_a_conversion_that_differs_from_keras_is_refused(strong, monkeypatch):
    """The converter's file is swapped for that of the same network with slightly changed weights."""
    model, layers, converted = strong
    tampered = build_tiny_strong()
    tampered.set_weights([w + np.float32(1e-3) for w in model.get_weights()])
    convert_for_real = lite_engine._tflite_bytes
    head_layer = converted.metadata["explain"]["head"]["layer"]
    monkeypatch.setattr(
        lite_engine,
        "_tflite_bytes",
        lambda served, quantize: convert_for_real(lite_engine._served_model(tampered, layers, head_layer), quantize),
    )
    with pytest.raises(lite_engine.ConversionError, match="differs from Keras on the probe batch"):
        lite_engine.convert(model, layers)


def test_threads_sharing_an_engine_get_what_serial_calls_get(strong):
    _, _, converted = strong
    engine = lite_engine.LiteEngine(converted.tflite, converted.metadata, num_threads=2)
    batches = [scale_pixels(images(size, seed=size), "unit") for size in (1, 2, 3, 5)]
    serial = [engine.outputs(batch) for batch in batches]
    failures = []

    def call(index: int) -> None:
        for _ in range(15):
            answers = engine.outputs(batches[index])
            if not all(np.array_equal(a, b) for a, b in zip(answers, serial[index], strict=True)):
                failures.append(index)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_serving_with_the_engine_never_imports_tensorflow(strong, tmp_path):
    _, _, converted = strong
    (tmp_path / "model.tflite").write_bytes(converted.tflite)
    (tmp_path / "model.json").write_text(json.dumps(converted.metadata))
    script = f"""
import json, sys
import numpy as np
from inference import lite_engine
engine = lite_engine.LiteEngine(open({str(tmp_path / "model.tflite")!r}, "rb").read(),
                                json.load(open({str(tmp_path / "model.json")!r})))
batch = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
assert engine.run(batch).logits.shape == (2, 10)
assert engine.explain(batch, [0, 1]).shape == (2, 3, 3)
print(sorted(name for name in sys.modules if name.split(".")[0] in ("tensorflow", "keras")))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_dynamic_range_int8_is_checked_by_its_own_logit_bound(strong, monkeypatch):
    model, layers, fp32 = strong
    int8 = lite_engine.convert(model, layers, quantize=True)
    assert int8.metadata["format"] == "litert-int8-dynamic"
    assert len(int8.tflite) < len(fp32.tflite)  # the larger kernels stored as int8
    logits_diff, bound = int8.metadata["probe_max_abs_diff"][0], int8.metadata["probe_logit_bound"]
    assert max(int8.metadata["probe_max_abs_diff"]) > 1e-4  # not fp32's answers: it would pass fp32's check
    assert logits_diff <= bound and bound >= lite_engine.INT8_LOGIT_TOLERANCE
    assert 0 <= int8.metadata["probe_top1_agreement"] <= 1
    engine = lite_engine.LiteEngine(int8.tflite, int8.metadata)
    assert engine.explain(scale_pixels(images(2), "unit"), [0, 1]).shape == (2, 3, 3)
    monkeypatch.setattr(lite_engine, "INT8_LOGIT_TOLERANCE", logits_diff / 1000)  # a bound it cannot meet
    with pytest.raises(lite_engine.ConversionError, match="int8 conversion differs from Keras"):
        lite_engine.convert(model, layers, quantize=True)
