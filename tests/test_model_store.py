"""The registry: import validation in one transaction, versions, activation, export, rehydration."""

import hashlib
import io
import json

import numpy as np
import pytest
from helpers import CIFAR10, build_seed_like_model
from sqlalchemy.exc import IntegrityError

import model_store
from model_store import ModelStoreError, ModelVersion, db
from predictor import softmax
from registry import model_files
from serving import load_version


def snapshot():
    """Everything the registry holds, to prove a refused import changed nothing."""
    return [(r.id, r.name, r.version, r.sha256, r.is_active) for r in model_store.list_models()]


def test_seed_file_imports_with_defaults_and_predicts_correctly(app, seed_model_file, tmp_path):
    import keras

    with app.app_context():
        row = model_store.get_active()
        assert (row.name, row.version, row.format) == ("seed", 1, "safetensors")
        assert row.filename == "modelo.safetensors"
        assert row.class_names == CIFAR10
        assert (row.input_shape, row.input_scale, row.output_kind, row.tta) == ([32, 32, 3], "unit", "logits", "none")
        assert row.size == len(row.blob) and row.sha256 == hashlib.sha256(row.blob).hexdigest()
        assert row.metrics["imported_from"] == {
            "filename": "modelo.h5",
            "format": "h5",
            "size": seed_model_file.stat().st_size,
            "sha256": hashlib.sha256(seed_model_file.read_bytes()).hexdigest(),
        }
        loaded = load_version(row, tmp_path)
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    reference = keras.saving.load_model(seed_model_file, compile=False)
    expected = softmax(np.asarray(reference(images.astype("float32") / 255.0)))
    got = loaded.predictor.predict_arrays(images)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_versions_increase_per_name_and_exactly_one_is_active(app, seed_model_file, other_model_file):
    with app.app_context():
        second = model_store.import_model(other_model_file, name="seed")
        third = model_store.import_model(seed_model_file, name="another", activate=True)
        assert (second.version, third.version) == (2, 1)
        assert [r.id for r in model_store.list_models() if r.is_active] == [third.id]
        model_store.activate(second.id)
        assert [r.id for r in model_store.list_models() if r.is_active] == [second.id]


def test_database_refuses_two_active_rows(app):
    with app.app_context():
        row = model_store.get_active()
        clone = ModelVersion(**{c.name: getattr(row, c.name) for c in ModelVersion.__table__.columns if c.name != "id"})
        clone.version = 99
        db.session.add(clone)
        with pytest.raises(IntegrityError):
            db.session.commit()
        db.session.rollback()


def _lambda_model(path):
    import keras

    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Lambda(lambda x: x * 2), keras.layers.Flatten(), keras.layers.Dense(10)]
    )
    model.save(path)


def _dense_model(path):
    import keras

    keras.Sequential([keras.Input((20,)), keras.layers.Dense(10)]).save(path)


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        (lambda p: p.write_text("not a model at all"), "not a Keras model file"),
        (lambda p: p.write_bytes(b""), "not a Keras model file"),
        (_dense_model, "not an image tensor"),
        (_lambda_model, "safe Keras model"),
    ],
    ids=["text", "empty", "not-image-input", "lambda-layer"],
)
def test_bad_files_are_refused_and_nothing_changes(app, tmp_path, make_file, message):
    path = tmp_path / "bad.h5"
    make_file(path)
    with app.app_context():
        before = snapshot()
        with pytest.raises(ModelStoreError, match=message):
            model_store.import_model(path, activate=True)
        assert snapshot() == before


def test_truncated_h5_is_refused(app, seed_model_file, tmp_path):
    path = tmp_path / "truncated.h5"
    path.write_bytes(seed_model_file.read_bytes()[:5000])
    with app.app_context():
        before = snapshot()
        with pytest.raises(ModelStoreError):
            model_store.import_model(path)
        assert snapshot() == before


def test_output_width_must_match_class_names(app, seed_model_file, three_class_model_file):
    with app.app_context():
        before = snapshot()
        with pytest.raises(ModelStoreError, match="10 outputs but 3 class names"):
            model_store.import_model(seed_model_file, class_names=["a", "b", "c"])
        with pytest.raises(ModelStoreError, match="3 outputs but 10 class names"):
            model_store.import_model(three_class_model_file)
        with pytest.raises(ModelStoreError, match="unique"):
            model_store.import_model(three_class_model_file, class_names=["a", "a", "b"])
        assert snapshot() == before
        row = model_store.import_model(three_class_model_file, class_names=["cat", "dog", "cow"])
        assert row.format == "safetensors" and row.class_names == ["cat", "dog", "cow"]
        assert row.metrics["imported_from"]["format"] == "keras"


def test_export_is_byte_for_byte(app, tmp_path):
    with app.app_context():
        row = model_store.get_active()
        written = model_store.export(row.id, tmp_path)
        assert written.name == "modelo.safetensors" and written.read_bytes() == row.blob
        again = model_store.import_model(written)  # an exported file imports as it is
        assert again.sha256 == row.sha256 and again.metrics["imported_from"]["format"] == "safetensors"


def test_the_registry_stores_the_model_without_hdf5(app, seed_model_file, tmp_path):
    """h5py's bundled HDF5 has heap overflows on crafted files: only the sandbox may parse HDF5."""
    import keras
    from safetensors import safe_open

    with app.app_context():
        row = model_store.get_active()
        stored = model_store.rehydrate(row, tmp_path)
    original = keras.saving.load_model(seed_model_file, compile=False)
    with safe_open(str(stored), framework="np") as handle:
        names, metadata = set(handle.keys()), handle.metadata()
    assert metadata["format"] == "imgcls-model" and json.loads(metadata["keras_config"])["class_name"] == "Sequential"
    assert names == {f"weights/{layer.name}/{v.name}" for layer in original.layers for v in layer.weights} | {
        "probe/logits"
    }
    resaved = model_store.load_keras_model(stored)
    for before, after in zip(original.get_weights(), resaved.get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    with pytest.raises(ModelStoreError, match="opened only in the sandbox"):
        model_store.load_keras_model(seed_model_file)


def test_only_a_well_formed_registry_file_is_recognised(app, seed_model_file, tmp_path):
    from safetensors.numpy import save

    with app.app_context():
        good = model_store.rehydrate(model_store.get_active(), tmp_path).read_bytes()
    hdf5_then_ours = tmp_path / "polyglot"
    hdf5_then_ours.write_bytes(seed_model_file.read_bytes() + good)
    foreign = save({"x": np.zeros(2, np.float32)}, metadata={"format": "pt"})  # a safetensors file, not ours
    assert model_files.is_model_file(io.BytesIO(good))
    assert not model_files.is_model_file(hdf5_then_ours) and not model_files.is_model_file(io.BytesIO(foreign))
    assert not model_files.is_model_file(io.BytesIO(b"\xff" * 8 + b"{}"))
    with pytest.raises(ModelStoreError, match="not a registry model file"):
        model_store.load_keras_model(hdf5_then_ours)


def test_a_version_stored_with_hdf5_is_not_served_until_upgraded(app, runner, seed_model_file, tmp_path):
    """Versions imported before the re-save keep their .h5 BLOB: `flask models upgrade-files`
    converts them once, in the sandbox; serving never converts."""
    data = seed_model_file.read_bytes()
    with app.app_context():
        row = model_store.get_active()
        row.blob, row.format, row.size, row.sha256 = data, "h5", len(data), hashlib.sha256(data).hexdigest()
        db.session.commit()
        with pytest.raises(ModelStoreError, match="upgrade-files"):
            load_version(row, tmp_path)
    result = runner.invoke(args=["models", "upgrade-files"])
    assert result.exit_code == 0, result.output
    assert "h5 -> safetensors" in result.output
    with app.app_context():
        row = model_store.get_active()
        assert row.format == "safetensors" and model_files.is_model_file(io.BytesIO(row.blob))
        loaded = load_version(row, tmp_path)
    images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert loaded.predictor.predict_arrays(images).shape == (2, 10)


def test_delete_refuses_the_active_model(app, other_model_file):
    with app.app_context():
        active = model_store.get_active()
        with pytest.raises(ModelStoreError, match="active"):
            model_store.delete(active.id)
        other = model_store.import_model(other_model_file)
        model_store.delete(other.id)
        assert [r.id for r in model_store.list_models()] == [active.id]


def test_rehydrate_writes_under_sha_and_reuses_a_good_file(app, tmp_path):
    with app.app_context():
        row = model_store.get_active()
        path = model_store.rehydrate(row, tmp_path)
        assert path.name == f"{row.sha256}.safetensors" and path.read_bytes() == row.blob
        stamp = path.stat().st_mtime_ns
        assert model_store.rehydrate(row, tmp_path).stat().st_mtime_ns == stamp  # reused, not rewritten
        path.write_bytes(b"damaged")
        assert model_store.rehydrate(row, tmp_path).read_bytes() == row.blob  # a wrong file is replaced
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_corrupt_blob_is_never_loaded_or_activated(app, other_model_file, tmp_path):
    cache = tmp_path / "cache"
    with app.app_context():
        other = model_store.import_model(other_model_file)
        other.blob = other.blob[:-10] + b"0123456789"
        db.session.commit()
        with pytest.raises(ModelStoreError, match="corrupt"):
            model_store.rehydrate(other, cache)
        with pytest.raises(ModelStoreError, match="corrupt"):
            model_store.activate(other.id)
        assert model_store.get_active().id != other.id
        assert not cache.exists() or list(cache.iterdir()) == []


def test_trained_metrics_supply_classes_and_tta(app, tmp_path):
    path = tmp_path / "model.h5"
    build_seed_like_model(num_classes=2).save(path)
    metrics = {"class_names": ["yes", "no"], "tta": "flip", "test_accuracy": 0.5}
    with app.app_context():
        row = model_store.import_model(path, metrics=metrics)
        assert (row.class_names, row.tta, row.metrics["test_accuracy"]) == (["yes", "no"], "flip", 0.5)
