"""The registry: import validation in one transaction, versions, activation, export, rehydration."""

import hashlib

import numpy as np
import pytest
from helpers import CIFAR10, build_seed_like_model
from sqlalchemy.exc import IntegrityError

import model_store
from model_store import ModelStoreError, ModelVersion, db
from predictor import softmax
from serving import load_version


def snapshot():
    """Everything the registry holds, to prove a refused import changed nothing."""
    return [(r.id, r.name, r.version, r.sha256, r.is_active) for r in model_store.list_models()]


def test_seed_file_imports_with_defaults_and_predicts_correctly(app, seed_model_file, tmp_path):
    import keras

    with app.app_context():
        row = model_store.get_active()
        assert row.name == "seed" and row.version == 1 and row.format == "h5"
        assert row.class_names == CIFAR10
        assert (row.input_shape, row.input_scale, row.output_kind, row.tta) == ([32, 32, 3], "unit", "logits", "none")
        assert row.size == seed_model_file.stat().st_size
        assert row.sha256 == hashlib.sha256(seed_model_file.read_bytes()).hexdigest()
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
        assert row.format == "keras" and row.class_names == ["cat", "dog", "cow"]


def test_export_is_byte_for_byte(app, seed_model_file, tmp_path):
    with app.app_context():
        written = model_store.export(model_store.get_active().id, tmp_path / "out.h5")
    assert written.read_bytes() == seed_model_file.read_bytes()


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
        assert path.name == f"{row.sha256}.h5" and path.read_bytes() == row.blob
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
