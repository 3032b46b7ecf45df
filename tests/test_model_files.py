"""The registry's model file: weights set by path, the probe check, export to standard Keras
files, and the conversion of the first (.npz) format."""

import zipfile

import numpy as np
import pytest
from helpers import build_seed_like_model
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import model_store
from model_store import db
from registry import model_files
from registry.model_files import ModelFileError


def bn_model():
    """A small CNN with BatchNormalization: four same-shaped (C,) vectors, all different."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(4, 3, name="conv"),
            layers.BatchNormalization(name="bn"),
            layers.GlobalAveragePooling2D(name="pool"),
            layers.Dense(3, name="dense"),
        ]
    )
    rng = np.random.default_rng(0)
    for variable in model.layers[1].weights:
        variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype("float32"))
    return model


def rewrite(path, change):
    """Write the file again with `change(tensors)` applied and the same header metadata."""
    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    save_file(change(tensors), str(path), metadata=metadata)


def test_weights_load_by_path_whatever_order_keras_gives_the_variables(tmp_path, monkeypatch):
    import keras

    model = bn_model()
    images = model_files.probe_batch((8, 8, 3))
    expected = model_files.model_outputs(model, images)
    path = tmp_path / "bn.safetensors"
    model_files.save_model_file(model, path)
    rewrite(path, lambda tensors: dict(reversed(list(tensors.items()))))  # stored order reversed
    # A Keras that lists BatchNormalization's variables in another order: by position, gamma
    # would get moving_variance and so on.
    original = keras.layers.BatchNormalization.weights
    monkeypatch.setattr(keras.layers.BatchNormalization, "weights", property(lambda self: original.fget(self)[::-1]))
    loaded = model_files.load_model_file(path)
    np.testing.assert_allclose(model_files.model_outputs(loaded, images), expected, rtol=1e-5, atol=1e-6)
    bn = {v.path.split("/")[-1]: v.numpy() for v in loaded.layers[1].weights}
    np.testing.assert_array_equal(bn["moving_variance"], model.layers[1].moving_variance.numpy())


def test_a_corrupted_tensor_fails_the_probe_check(tmp_path):
    path = tmp_path / "bn.safetensors"
    model_files.save_model_file(bn_model(), path)

    def swap(tensors):  # same shapes, other values: only the probe can tell
        gamma, variance = "weights/bn/gamma", "weights/bn/moving_variance"
        tensors[gamma], tensors[variance] = tensors[variance], tensors[gamma]
        return tensors

    rewrite(path, swap)
    with pytest.raises(ModelFileError, match="recorded outputs on the probe images"):
        model_files.load_model_file(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: {k: v for k, v in t.items() if not k.endswith("moving_mean")}, "missing"),
        (lambda t: {**t, "weights/extra/kernel": np.zeros(2, np.float32)}, "unexpected"),
        (lambda t: {**t, "weights/dense/bias": np.zeros(4, np.float32)}, "stored as"),
    ],
)
def test_missing_extra_or_misshapen_weights_are_refused(tmp_path, change, message):
    path = tmp_path / "bn.safetensors"
    model_files.save_model_file(bn_model(), path)
    rewrite(path, change)
    with pytest.raises(ModelFileError, match=message):
        model_files.load_model_file(path)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_export_gives_a_standard_keras_file_with_the_same_outputs(app, runner, seed_model_file, tmp_path, suffix):
    import keras

    out = tmp_path / f"back{suffix}"
    result = runner.invoke(args=["models", "export", "1", str(out)])
    assert result.exit_code == 0, result.output
    images = np.random.default_rng(5).random((3, 32, 32, 3), dtype=np.float32)
    original = keras.models.load_model(seed_model_file, compile=False)
    exported = keras.models.load_model(out, compile=False)
    np.testing.assert_allclose(np.asarray(exported(images)), np.asarray(original(images)), rtol=1e-5, atol=1e-6)


def npz_file_bytes(model, path) -> bytes:
    """A model as the registry's first format stored it (config + weights by position)."""
    arrays = {"config": np.frombuffer(model.to_json().encode(), dtype=np.uint8)}
    arrays |= {f"weight_{i}": w for i, w in enumerate(model.get_weights())}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(zipfile.ZipInfo(f"{name}.npy"), "w") as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
    return path.read_bytes()


def test_old_npz_rows_are_converted_once_by_upgrade_files(app, runner, tmp_path):
    model = build_seed_like_model(random_seed=4)
    data = npz_file_bytes(model, tmp_path / "old.npz")
    with app.app_context():
        row = model_store.get_active()
        row.blob, row.format, row.size, row.sha256 = data, "npz", len(data), model_store.sha256_of(data)
        row.filename = "modelo.npz"
        db.session.commit()
        with pytest.raises(model_store.ModelStoreError, match="upgrade-files"):
            model_store.served_file(row, tmp_path / "cache")
    result = runner.invoke(args=["models", "upgrade-files"])
    assert result.exit_code == 0 and "npz -> safetensors" in result.output, result.output
    with app.app_context():
        row = model_store.get_active()
        assert (row.format, row.filename) == ("safetensors", "modelo.safetensors")
        loaded = model_store.load_keras_model(model_store.served_file(row, tmp_path / "cache"))
    images = model_files.probe_batch((32, 32, 3))
    np.testing.assert_allclose(model_files.model_outputs(loaded, images), model_files.model_outputs(model, images))
    again = runner.invoke(args=["models", "upgrade-files"])
    assert "0 model(s) upgraded" in again.output
