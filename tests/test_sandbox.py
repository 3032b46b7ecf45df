"""Model import in a sandbox: caps on file size and parameters, and the validation load in a child
process under memory and CPU limits, so a hostile file fails the import with a clear message."""

import pytest

import model_store
from model_sandbox import ImportLimits
from model_store import ModelStoreError

ISOLATED = ImportLimits(isolated=True)


def refused(app, path, limits) -> str:
    with app.app_context(), pytest.raises(ModelStoreError) as caught:
        model_store.import_model(path, name="hostile", limits=limits)
    with app.app_context():
        assert [row.name for row in model_store.list_models()] == ["seed"]  # nothing was stored
    return str(caught.value)


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(app, seed_model_file):
    message = refused(app, seed_model_file, ImportLimits(max_bytes=1000))
    assert "the limit for a model file is" in message


def test_a_model_over_the_parameter_cap_is_refused_in_the_child(app, seed_model_file):
    message = refused(app, seed_model_file, ImportLimits(max_params=100, isolated=True))
    assert "weights: the limit is 100 parameters" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_crafted_or_truncated_hdf5_file_is_refused_in_the_child(app, seed_model_file, tmp_path, damage):
    data = seed_model_file.read_bytes()
    hostile = data[: len(data) // 3] if damage == "truncated" else data[:8] + b"\xff" * 4096
    path = tmp_path / "hostile.h5"
    path.write_bytes(hostile)
    assert "not a readable HDF5 file" in refused(app, path, ISOLATED)


def test_a_child_over_the_memory_limit_is_a_clear_error(app, seed_model_file):
    message = refused(app, seed_model_file, ImportLimits(memory_bytes=64 * 1024**2, isolated=True))
    assert "needs more than the 0.1 GB of memory the import allows" in message


def test_the_cli_survives_a_hostile_file(app, runner, seed_model_file, tmp_path):
    app.config.update(MODEL_IMPORT_SANDBOX=True, MODEL_IMPORT_MEMORY_BYTES=64 * 1024**2)
    result = runner.invoke(args=["models", "import", str(seed_model_file)])
    assert result.exit_code == 1 and "import refused, nothing was stored" in result.output
    assert "of memory the import allows" in result.output
    assert runner.invoke(args=["models", "list"]).exit_code == 0


@pytest.mark.slow
def test_the_cli_imports_a_good_model_through_the_sandbox(app, runner, other_model_file):
    app.config.update(MODEL_IMPORT_SANDBOX=True)
    result = runner.invoke(args=["models", "import", str(other_model_file), "--name", "checked"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        row = next(row for row in model_store.list_models() if row.name == "checked")
        assert row.input_shape == [32, 32, 3] and row.output_kind == "logits"


def test_export_to_h5_is_written_in_the_child_and_loads_in_plain_keras(app, seed_model_file, tmp_path):
    import keras
    import numpy as np

    with app.app_context():
        written = model_store.export(1, tmp_path / "back.h5", ISOLATED)
    images = np.random.default_rng(6).random((2, 32, 32, 3), dtype=np.float32)
    expected = keras.models.load_model(seed_model_file, compile=False)(images)
    got = keras.models.load_model(written, compile=False)(images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
