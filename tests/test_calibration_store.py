"""The calibration's OOD arrays as a BLOB beside a small JSON record; metrics under one key set."""

import json

import numpy as np
from helpers import FORCED, force_calibration
from sqlalchemy import event

import model_store
from database import db
from inference import calibration
from registry import metrics_schema


def test_calibration_arrays_round_trip_through_the_blob(app):
    record = force_calibration(app, **FORCED["confident"])
    with app.app_context():
        small = model_store.get_calibration(1)
        whole = model_store.get_full_calibration(1)
    assert "means" not in small["ood"] and "precisions" not in small["ood"]
    assert len(json.dumps(small)) < 20_000  # the card's JSON: bins and curves, no matrices
    for key in ("means", "precisions"):
        for stored, fitted in zip(whole["ood"][key], record["ood"][key], strict=True):
            np.testing.assert_array_equal(stored, np.asarray(fitted, np.float32))
    served = calibration.Calibration.from_record(whole)
    assert served.ood.threshold == record["ood"]["threshold"] and served.feature_layers == tuple(small["ood"]["layers"])


def test_the_model_card_never_reads_the_arrays(app, client):
    force_calibration(app, **FORCED["confident"])
    client.get("/models/1")  # the served model picks up its calibration (serving reads the arrays)
    statements = []
    with app.app_context():
        engine = db.engine
    listener = lambda conn, cursor, statement, *args: statements.append(statement)  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        assert client.get("/models/1").status_code == 200
        assert client.get("/models/1/reliability.png").status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    reads = [s for s in statements if "model_calibrations" in s]
    assert reads and not [s for s in reads if "stats" in s]


def test_old_metric_keys_are_mapped_once_at_import(app, runner, seed_model_file, tmp_path):
    old = {"epochs": 3, "batch_size": 512, "learning_rate": 0.8, "weight_decay": 0.005, "precision": "float32"}
    old |= {"seed": 7, "arch": "seed", "test_accuracy": 0.5}
    assert metrics_schema.normalise(old) == {
        "epochs": 3,
        "arch": "seed",
        "test_accuracy": 0.5,
        "random_seed": 7,
        "recipe": {"batch_size": 512, "learning_rate": 0.8, "weight_decay": 0.005, "precision": "float32"},
    }
    metrics = tmp_path / "old-metrics.json"
    metrics.write_text(json.dumps(old))
    result = runner.invoke(args=["models", "import", str(seed_model_file), "--metrics", str(metrics)])
    assert result.exit_code == 0, result.output
    with app.app_context():
        row = model_store.list_models()[0]
        assert "seed" not in row.metrics and "batch_size" not in row.metrics
        assert row.metrics["random_seed"] == 7 and row.metrics["recipe"]["batch_size"] == 512
    page = app.test_client().get(f"/models/{row.id}").get_data(as_text=True)
    assert "batch 512" in page and "seed 7" in page


def test_metrics_json_keeps_the_arrays_beside_it(tmp_path):
    rng = np.random.default_rng(0)
    ood = {"layers": ["a"], "means": [rng.random((3, 4))], "precisions": [rng.random((4, 4))], "threshold": 1.0}
    metrics = {"seed": 1, "calibration": {"temperature": 1.5, "ood": ood}}
    path = tmp_path / "metrics.json"
    metrics_schema.write_metrics(path, metrics)
    written = json.loads(path.read_text())
    assert "means" not in written["calibration"]["ood"] and written["random_seed"] == 1
    assert (tmp_path / metrics_schema.CALIBRATION_FILE).is_file()
    back = metrics_schema.read_metrics(path)["calibration"]["ood"]
    np.testing.assert_array_equal(back["precisions"][0], ood["precisions"][0].astype(np.float32))
