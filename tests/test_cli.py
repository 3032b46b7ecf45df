"""Every `flask` command, through the real CLI runner, database and model files."""

import json

from helpers import image_bytes, random_image_bytes

import model_store


def test_init_db_is_idempotent(runner):
    result = runner.invoke(args=["init-db"])
    assert result.exit_code == 0 and "database ready" in result.output


def test_import_list_activate_export_delete(app, runner, other_model_file, tmp_path):
    result = runner.invoke(args=["models", "import", str(other_model_file), "--name", "other"])
    assert result.exit_code == 0 and "other v1 (inactive" in result.output
    listing = runner.invoke(args=["models", "list"]).output
    assert "seed" in listing and "other" in listing
    with app.app_context():
        other_id = next(r.id for r in model_store.list_models() if r.name == "other")
    assert runner.invoke(args=["models", "activate", str(other_id)]).exit_code == 0
    with app.app_context():
        assert model_store.get_active().id == other_id
    out = tmp_path / "exported.npz"
    assert runner.invoke(args=["models", "export", str(other_id), str(out)]).exit_code == 0
    with app.app_context():
        assert out.read_bytes() == model_store.get_model(other_id).blob
    refused = runner.invoke(args=["models", "delete", str(other_id)])
    assert refused.exit_code == 1 and "active model" in refused.output
    seed_id = next(i for i in (1, 2) if i != other_id)
    assert runner.invoke(args=["models", "delete", str(seed_id)]).exit_code == 0
    with app.app_context():
        assert [r.id for r in model_store.list_models()] == [other_id]


def test_import_reads_classes_flag_and_metrics_sidecar(app, runner, three_class_model_file, tmp_path):
    result = runner.invoke(
        args=["models", "import", str(three_class_model_file), "--classes", "cat, dog ,cow", "--activate"]
    )
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert model_store.get_active().class_names == ["cat", "dog", "cow"]
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "model.keras").write_bytes(three_class_model_file.read_bytes())
    (trained / "metrics.json").write_text(json.dumps({"class_names": ["x", "y", "z"], "test_accuracy": 0.9}))
    assert runner.invoke(args=["models", "import", str(trained / "model.keras"), "--name", "t"]).exit_code == 0
    with app.app_context():
        row = next(r for r in model_store.list_models() if r.name == "t")
        assert row.class_names == ["x", "y", "z"] and row.metrics["test_accuracy"] == 0.9


def test_import_refusals_exit_non_zero_and_store_nothing(app, runner, tmp_path, seed_model_file):
    bad = tmp_path / "bad.h5"
    bad.write_text("nope")
    # Each refusal names its own reason: any click failure (an unknown option, say) prints "Error".
    for args, reason in (
        (["models", "import", str(bad)], "import refused, nothing was stored: not a Keras model file"),
        (["models", "import", str(tmp_path / "missing.h5")], f"no such file: {tmp_path / 'missing.h5'}"),
        (
            ["models", "import", str(seed_model_file), "--classes", "a,b"],
            "the model has 10 outputs but 2 class names were given",
        ),
    ):
        result = runner.invoke(args=args)
        assert result.exit_code == 1 and reason in result.output, result.output
    with app.app_context():
        assert len(model_store.list_models()) == 1


def test_import_if_empty_skips_a_filled_registry(app, runner, seed_model_file):
    result = runner.invoke(args=["models", "import", str(seed_model_file), "--if-empty"])
    assert result.exit_code == 0 and "nothing imported" in result.output
    with app.app_context():
        assert len(model_store.list_models()) == 1


def test_unknown_ids_fail_clearly(runner, tmp_path):
    for args in (
        ["models", "activate", "42"],
        ["models", "export", "42", str(tmp_path / "x.h5")],
        ["models", "delete", "42"],
    ):
        result = runner.invoke(args=args)
        assert result.exit_code == 1 and "no model with id 42" in result.output


def test_predict_prints_top_classes(runner, tmp_path):
    good = tmp_path / "photo.jpg"
    good.write_bytes(image_bytes())
    noise = tmp_path / "noise.png"
    noise.write_bytes(random_image_bytes())
    result = runner.invoke(args=["predict", "--top-k", "2", str(good), str(noise)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("model 1: seed v1")
    assert lines[1].startswith(f"{good}: ") and lines[1].count("%") == 2
    broken = tmp_path / "broken.jpg"
    broken.write_text("text")
    failed = runner.invoke(args=["predict", str(broken)])
    assert failed.exit_code == 1 and "not an image" in failed.output


def test_check_db_finds_a_corrupt_blob(app, runner):
    assert runner.invoke(args=["models", "check"]).exit_code == 0
    with app.app_context():
        row = model_store.get_active()
        row.blob = b"x" + row.blob[1:]
        model_store.db.session.commit()
    result = runner.invoke(args=["models", "check"])
    assert result.exit_code == 1 and "CORRUPT" in result.output
