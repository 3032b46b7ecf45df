"""Dynamic-range int8 as an import option (issue 21, item 5): `flask models import --engine int8`
stores an int8 conversion, the worker serves it, and it is served only with a calibration fitted on
its own outputs (`flask calibrate` fits one); a default import stays fp32."""

from __future__ import annotations

import numpy as np
from helpers import random_image_bytes, serve_registry
from PIL import Image

import engine_store
import model_store
from inference import lite_engine
from predictor import scale_pixels
from web.extensions import model_serving

INT8 = "litert-int8-dynamic"


def _import_int8(runner, path) -> model_store.ModelVersion:
    result = runner.invoke(
        args=["models", "import", str(path), "--name", "quantised", "--engine", "int8", "--activate"]
    )
    assert result.exit_code == 0, result.output
    assert "int8" in result.output and "flask calibrate" in result.output
    return model_store.list_models()[0]


def _folder(root, per_class: int = 6):
    """A tiny image-folder data set: train/ and test/ with random images of every class."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_an_int8_import_stores_an_int8_conversion_and_a_default_import_stays_fp32(app, runner, other_model_file):
    with app.app_context():
        seed = model_store.get_active()
        default = engine_store.get(seed.sha256)
        assert default.format == "litert-fp32" and max(default.details["probe_max_abs_diff"]) <= 1e-4
        row = _import_int8(runner, other_model_file)
        stored = engine_store.get(row.sha256)
        assert stored.format == INT8 and stored.details["format"] == INT8
        assert stored.size < default.size  # the dense kernel stored as int8
        details = stored.details
    # Checked by its own bound, not fp32's 1e-4 (which it does not meet).
    assert 1e-4 < details["probe_max_abs_diff"][0] <= details["probe_logit_bound"]
    assert 0 <= details["probe_top1_agreement"] <= 1


def test_the_worker_serves_the_int8_conversion(app, runner, other_model_file):
    with app.app_context():
        row = _import_int8(runner, other_model_file)
        row_id, stored = row.id, engine_store.get(row.sha256)
        int8 = lite_engine.LiteEngine(stored.blob, stored.details)
        keras_model = model_store.load_keras_model(model_store.served_file(row, app.config["MODEL_CACHE_DIR"]))
    serve_registry(app)
    with app.app_context():
        loaded = model_serving.slot()
    assert loaded.id == row_id
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    served = loaded.predictor.infer(images)[0]
    batch = scale_pixels(images, "unit")
    np.testing.assert_allclose(served, int8.run(batch).logits, rtol=0, atol=1e-6)
    assert np.abs(served - np.asarray(keras_model(batch, training=False))).max() > 1e-4  # not the fp32 answers
    answer = app.test_client().post("/api/v1/predict", data=random_image_bytes(2), content_type="image/png")
    assert answer.status_code == 200, answer.get_json()


def test_an_int8_version_is_served_only_with_a_calibration_fitted_on_its_outputs(
    app, runner, other_model_file, tmp_path
):
    from serving import spec_of
    from training.calibration_fit import calibrate_model

    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8), np.arange(120) % 10
    with app.app_context():
        row = _import_int8(runner, other_model_file)
        row_id = row.id
        keras_model = model_store.load_keras_model(model_store.served_file(row, app.config["MODEL_CACHE_DIR"]))
        # A calibration fitted on the Keras model, as train.py or an older `flask calibrate` fits one.
        record = calibrate_model(keras_model, spec_of(row), images[:60], labels[:60], images[60:], labels[60:])
        assert record["fitted_on"] == "keras"
        model_store.set_calibration(row.id, record)
    serve_registry(app)
    health = app.test_client().get("/healthz")
    error = health.get_json()["error"]
    assert health.status_code == 503 and INT8 in error and "fitted on keras" in error and "flask calibrate" in error

    result = runner.invoke(args=["calibrate", str(row_id), "--data", str(_folder(tmp_path / "data"))])
    assert result.exit_code == 0 and f"fitted on {INT8} outputs" in result.output, result.output
    with app.app_context():
        assert model_store.get_full_calibration(row_id)["fitted_on"] == INT8
    serve_registry(app)
    assert app.test_client().get("/healthz").status_code == 200
    answer = app.test_client().post("/api/v1/predict", data=random_image_bytes(3), content_type="image/png")
    assert answer.status_code == 200 and answer.get_json()["predictions"][0]["ood_score"] is not None


def test_an_fp32_version_is_not_served_with_a_calibration_fitted_on_int8_outputs(app):
    with app.app_context():
        row = model_store.get_active()
        record = {**_any_calibration(app), "fitted_on": INT8}
        model_store.set_calibration(row.id, record)
    serve_registry(app)
    health = app.test_client().get("/healthz")
    assert health.status_code == 503 and "litert-fp32" in health.get_json()["error"]


def _any_calibration(app) -> dict:
    from helpers import FORCED, force_calibration

    return force_calibration(app, **FORCED["confident"])


def test_a_file_stored_with_one_conversion_is_not_imported_with_another(app, runner, tmp_path):
    with app.app_context():
        stored = model_store.export(1, tmp_path)  # the registry's file byte for byte: the same sha256
    result = runner.invoke(args=["models", "import", str(stored), "--engine", "int8"])
    assert result.exit_code != 0 and "one file has one conversion" in result.output, result.output
    with app.app_context():
        assert len(model_store.list_models()) == 1
        assert engine_store.get(model_store.get_model(1).sha256).format == "litert-fp32"


def _retrained_copy(model_file, folder):
    """Another file of the same network, layer names included (a calibration's OOD layers name
    them): one weight nudged, as a retraining would change it. Not the same file: a file already
    stored with an fp32 conversion is refused as int8."""
    import keras

    model = keras.models.load_model(model_file, compile=False)
    kernel = model.layers[0].kernel
    kernel.assign(kernel.numpy() + 1e-3)
    path = folder / "retrained.h5"
    model.save(path)
    return path


def test_an_int8_import_does_not_store_the_calibration_fitted_on_the_keras_model(app, seed_model_file, tmp_path):
    from helpers import FORCED, force_calibration

    record = force_calibration(app, **FORCED["unsure"])  # fitted on the Keras model, as train.py's
    retrained = _retrained_copy(seed_model_file, tmp_path)
    with app.app_context():
        row = model_store.import_model(retrained, name="q", metrics={"calibration": record}, engine="int8")
        assert model_store.get_calibration(row.id) is None and "calibration" not in row.metrics


def test_upgrade_files_converts_an_int8_version_again_as_int8(app, runner, other_model_file):
    from helpers import FORCED, force_calibration

    with app.app_context():
        sha256 = _import_int8(runner, other_model_file).sha256
    force_calibration(app, **FORCED["confident"])  # a calibration naming OOD layers...
    with app.app_context():
        stored = engine_store.get(sha256)
        stored.details = {**stored.details, "feature_layers": []}  # ...its conversion lacks
        model_store.db.session.commit()
    result = runner.invoke(args=["models", "upgrade-files"])
    assert result.exit_code == 0 and "no features of its OOD layers" in result.output, result.output
    with app.app_context():
        assert engine_store.get(sha256).format == INT8
