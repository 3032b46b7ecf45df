"""Convert at import: every stored model gets a LiteRT conversion checked against Keras, kept beside
it by the model file's sha256; a conversion that differs refuses the import; versions stored
without one are converted once by `flask models upgrade-files`, never by a worker; a conversion
goes with the last version of its file."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import random_image_bytes, serve_registry

import engine_store
import model_store
from database import db
from inference import lite_engine
from inference.ood import block_ends, default_layers, with_pooled_features
from predictor import scale_pixels


def test_an_import_stores_a_conversion_by_sha256_that_answers_as_the_model(app):
    with app.app_context():
        row = model_store.get_active()
        stored = engine_store.get(row.sha256)
        model = model_store.load_keras_model(model_store.served_file(row, app.config["MODEL_CACHE_DIR"]))
        assert stored.size == len(stored.blob) and stored.sha256 == model_store.sha256_of(stored.blob)
        details = stored.details
    assert details["format"] == "litert-fp32" and max(details["probe_max_abs_diff"]) <= 1e-4
    assert tuple(details["feature_layers"]) == tuple(block_ends(model))  # the default OOD layers among them
    assert set(default_layers(model)) <= set(details["feature_layers"])
    engine = lite_engine.LiteEngine(stored.blob, details)
    batch = scale_pixels(np.random.default_rng(4).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), "unit")
    want = with_pooled_features(model, tuple(details["feature_layers"]))([batch], training=False)
    got = engine.run(batch)
    for mine, theirs in zip([got.logits, *got.features], want, strict=True):
        np.testing.assert_allclose(mine, np.asarray(theirs), rtol=0, atol=1e-4)


def test_a_conversion_that_differs_from_the_model_refuses_the_import(app, other_model_file, monkeypatch):
    import keras

    convert_for_real = lite_engine._tflite_bytes

    def tampered(served, quantize):  # the same network with its weights moved by 1e-3
        clone = keras.models.clone_model(served)
        clone.set_weights([w + np.float32(1e-3) for w in served.get_weights()])
        return convert_for_real(clone, quantize)

    monkeypatch.setattr(lite_engine, "_tflite_bytes", tampered)
    with app.app_context():
        before = [(r.id, r.sha256) for r in model_store.list_models()]
        with pytest.raises(model_store.ModelStoreError, match="conversion for the serving engine does not answer"):
            model_store.import_model(other_model_file, name="other")
        assert [(r.id, r.sha256) for r in model_store.list_models()] == before
        assert db.session.query(engine_store.EngineFile).count() == 1


def test_a_version_without_a_conversion_is_converted_once_by_upgrade_files(app, make_app, runner):
    with app.app_context():
        sha256 = model_store.get_active().sha256
        db.session.delete(engine_store.get(sha256))
        db.session.commit()
    worker = make_app(instance="worker")  # a new worker on the same database: it never converts
    serve_registry(worker)
    health = worker.test_client().get("/healthz")
    assert health.status_code == 503 and "upgrade-files" in health.get_json()["error"]
    result = runner.invoke(args=["models", "upgrade-files"])
    assert result.exit_code == 0 and "no engine file -> safetensors" in result.output, result.output
    with app.app_context():
        assert model_store.get_active().sha256 == sha256  # the stored model file itself is unchanged
        assert engine_store.get(sha256) is not None
    again = runner.invoke(args=["models", "upgrade-files"])
    assert "0 model(s) upgraded" in again.output
    restarted = make_app(instance="restarted")  # a worker started after the upgrade serves it
    serve_registry(restarted)
    assert restarted.test_client().get("/healthz").status_code == 200


def test_a_calibration_on_layers_the_conversion_lacks_is_served_after_upgrade_files(app, make_app, runner, tmp_path):
    """The conversion answers the block ends' features; a calibration on another layer (here the
    first of two convolutions at one resolution) is served once `upgrade-files` converts again."""
    import keras
    from keras import layers

    from serving import spec_of
    from training.calibration_fit import calibrate_model

    keras.utils.set_random_seed(6)
    inputs = keras.Input(shape=(32, 32, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_a")(inputs)
    x = layers.Conv2D(4, 3, padding="same", activation="relu", name="conv_b")(x)
    model = keras.Model(inputs, layers.Dense(10)(layers.GlobalAveragePooling2D()(x)))
    model.save(tmp_path / "two.keras")
    rng = np.random.default_rng(2)
    images, labels = rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8), np.arange(120) % 10
    with app.app_context():
        row = model_store.import_model(tmp_path / "two.keras", name="two", activate=True)
        assert engine_store.get(row.sha256).details["feature_layers"] == ["conv_b"]
        record = calibrate_model(
            model, spec_of(row), images[:60], labels[:60], images[60:], labels[60:], layers=("conv_a",)
        )
        model_store.set_calibration(row.id, record)
    worker = make_app(instance="worker")
    serve_registry(worker)
    health = worker.test_client().get("/healthz")
    assert (
        health.status_code == 503
        and "conv_a" in health.get_json()["error"]
        and "upgrade-files" in health.get_json()["error"]
    )
    result = runner.invoke(args=["models", "upgrade-files"])
    assert result.exit_code == 0 and "no features of its OOD layers -> safetensors" in result.output, result.output
    restarted = make_app(instance="restarted")
    serve_registry(restarted)
    answer = restarted.test_client().post("/api/v1/predict", data=random_image_bytes(3), content_type="image/png")
    assert answer.status_code == 200 and answer.get_json()["predictions"][0]["ood_score"] is not None


def test_a_conversion_goes_with_the_last_version_of_its_file(app, other_model_file, tmp_path):
    with app.app_context():
        active = model_store.get_active()
        same_file = model_store.export(active.id, tmp_path / "same.safetensors")  # stored as it is: same sha256
        copy = model_store.import_model(same_file, name="copy")
        assert copy.sha256 == active.sha256
        model_store.delete(copy.id)
        assert engine_store.get(active.sha256) is not None  # still the conversion of a stored version
        other = model_store.import_model(other_model_file, name="other")
        assert engine_store.get(other.sha256) is not None
        model_store.delete(other.id)
        assert engine_store.get(other.sha256) is None
