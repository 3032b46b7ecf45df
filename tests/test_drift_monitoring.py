"""Drift monitoring through the app: the reference stored with the model, drift samples kept
through the recording path, windows closed every 500 predictions and by day, the report, the
Monitoring page and the gauges, and what survives the retention purge."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from helpers import classify, fitted_calibration, login, make_user, serve_registry, uniform_images
from PIL import Image
from sqlalchemy import func, select, update
from test_decisions import _folder

import model_store
import prediction_history
from database import db
from inference.image_statistics import image_statistics
from monitoring import store, windows
from monitoring.reference import REFERENCE_FILE, Reference
from monitoring.store import DriftReference, DriftSample, DriftWindow, references

BATCH = 64


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")  # lossless: the model sees these very pixels
    return buffer.getvalue()


def calibrate_with_reference(app) -> Reference:
    """Calibrate the active model on random images and fit its drift reference on held-out ones."""
    with app.app_context():
        row = model_store.get_active()
        record, reference = fitted_calibration(app, row, images=400, reference_images=2000)
        model_store.set_calibration(row.id, record)
        store.set_reference(row.id, reference)
    serve_registry(app)
    return reference


def send(client, images: np.ndarray) -> None:
    for start in range(0, len(images), BATCH):
        response = classify(client, *(png(p) for p in images[start : start + BATCH]))
        assert response.status_code == 200, response.get_json()


@pytest.fixture
def monitored(app):
    calibrate_with_reference(app)
    return app


def test_each_recorded_prediction_keeps_its_drift_floats(monitored):
    images = uniform_images(3, 3)
    send(monitored.test_client(), images)
    with monitored.app_context():
        samples = list(db.session.scalars(select(DriftSample).order_by(DriftSample.id)))
        entries = list(db.session.scalars(select(prediction_history.HistoryEntry).order_by("id")))
        reference = references.get(1)
    assert [s.prediction_id for s in samples] == [e.id for e in entries]
    for sample, entry, pixels in zip(samples, entries, images, strict=True):
        expected = image_statistics(pixels)
        assert sample.brightness_mean == pytest.approx(expected.brightness_mean)
        assert sample.sharpness == pytest.approx(expected.sharpness)
        assert sample.top_probability == pytest.approx(entry.confidence)
        assert sample.decision == entry.decision and sample.ood_score == pytest.approx(entry.ood_score)
        assert len(sample.embedding) == len(reference.pca.components) > 0


@pytest.mark.slow
def test_a_window_closes_every_500_predictions_and_flags_darker_photos(monitored):
    client = monitored.test_client()
    send(client, uniform_images(4, 499))
    with monitored.app_context():
        assert db.session.scalar(select(func.count()).select_from(DriftWindow)) == 0
    send(client, uniform_images(5, 1))
    send(client, uniform_images(6, 500, high=90))  # darker, flatter photos
    result = monitored.test_cli_runner().invoke(args=["drift", "report", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [w["count"] for w in report["windows"]] == [500, 500]
    same, dark = report["windows"]
    assert {"model", "start", "end", "count", "estimated_accuracy", "alerts"} <= set(same)
    assert same["model"] == {"id": 1, "name": "seed", "version": 1}
    assert same["alerts"] == [], [t for t in same["tests"] if t["drift"]]
    assert "input" in dark["alerts"]
    flagged = {t["name"] for t in dark["tests"] if t["drift"]}
    assert {"ks_brightness_mean", "ks_brightness_std"} <= flagged
    text = monitored.test_cli_runner().invoke(args=["drift", "report"]).output
    assert "seed v1" in text and "input" in text


def test_report_since_and_a_bad_time(monitored):
    send(monitored.test_client(), uniform_images(4, 500))
    runner = monitored.test_cli_runner()
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert json.loads(runner.invoke(args=["drift", "report", "--json", "--since", later]).output) == {"windows": []}
    assert (
        len(json.loads(runner.invoke(args=["drift", "report", "--json", "--since", "2020-01-01"]).output)["windows"])
        == 1
    )
    bad = runner.invoke(args=["drift", "report", "--since", "yesterday"])
    assert bad.exit_code == 2 and "is not an ISO time" in bad.output


def test_windows_outlive_the_retention_purge(monitored):
    send(monitored.test_client(), uniform_images(4, 500))
    with monitored.app_context():
        assert prediction_history.purge_all() == 500
        assert db.session.scalar(select(func.count()).select_from(DriftSample)) == 0
        assert db.session.scalar(select(func.count()).select_from(DriftWindow)) == 1


def test_day_and_week_windows_need_their_minimum(monitored):
    send(monitored.test_client(), uniform_images(4, 250))
    with monitored.app_context():
        ten_days_ago = datetime.now(UTC) - timedelta(days=10)
        db.session.execute(update(DriftSample).values(created_at=ten_days_ago))
        # The reference was fitted before them: samples older than their reference are never in a window.
        db.session.execute(update(DriftReference).values(created_at=ten_days_ago - timedelta(hours=1)))
        db.session.commit()
        assert windows.close_period_windows(1, minimum=300) == 0
        assert windows.close_period_windows(1) == 2  # the day and the week of ten days ago
        assert windows.close_period_windows(1) == 0  # closed once
        kinds = sorted(w.kind for w in windows.windows())
    assert kinds == ["day", "week"]


def test_a_refit_starts_the_windows_again(monitored):
    # Predictions scored under the calibration and reference a refit replaces never share a window
    # with those after it: the old ones alone are not a window (too few), the new ones make one.
    client = monitored.test_client()
    send(client, uniform_images(4, 100))
    with monitored.app_context():
        store.set_reference(1, references.get(1))  # as `flask calibrate` does again
        first_after = db.session.scalar(select(func.max(DriftSample.id))) + 1
    send(client, uniform_images(5, 200))
    with monitored.app_context():
        assert windows.close_count_windows(1, size=200) == 1
        assert windows.close_count_windows(1, size=200) == 0
        window = db.session.scalar(select(DriftWindow))
        assert (window.key, window.count) == (f"n{first_after}", 200)
        assert window.last_sample_id == db.session.scalar(select(func.max(DriftSample.id)))
        # Days and weeks too: moved to one past day (noon, the refit; an hour before and after it),
        # the day and the week hold only the 200 made since the refit.
        noon = (datetime.now(UTC) - timedelta(days=10)).replace(hour=12, minute=0, second=0, microsecond=0)
        hour = timedelta(hours=1)
        db.session.execute(update(DriftSample).where(DriftSample.id < first_after).values(created_at=noon - hour))
        db.session.execute(update(DriftSample).where(DriftSample.id >= first_after).values(created_at=noon + hour))
        db.session.execute(update(DriftReference).values(created_at=noon))
        db.session.commit()
        assert windows.close_period_windows(1, minimum=201) == 0
        assert windows.close_period_windows(1, minimum=200) == 2


def test_a_refit_first_closes_the_days_and_weeks_already_due(monitored, tmp_path):
    # 200 predictions of a day ten days ago, under the reference fitted that morning: their day
    # and week are over but not closed yet (no prediction since). A refit must not orphan them.
    send(monitored.test_client(), uniform_images(4, 200))
    morning = (datetime.now(UTC) - timedelta(days=10)).replace(hour=6, minute=0, second=0, microsecond=0)
    with monitored.app_context():
        db.session.execute(update(DriftSample).values(created_at=morning + timedelta(hours=6)))
        db.session.execute(update(DriftReference).values(created_at=morning))
        db.session.commit()
    data = _folder(tmp_path / "data")
    runner = monitored.test_cli_runner()
    refit = runner.invoke(args=["drift", "fit-reference", "1", "--data", str(data), "--val-fraction", "0.5"])
    assert refit.exit_code == 0, refit.output
    with monitored.app_context():
        assert sorted((w.kind, w.count) for w in windows.windows()) == [("day", 200), ("week", 200)]


def test_monitoring_page_plot_and_gauges(monitored):
    client = monitored.test_client()
    send(client, uniform_images(4, 500))
    assert client.get("/monitoring").status_code == 401
    make_user(monitored.test_cli_runner(), "member")
    login(client, "member")
    refused = client.get("/monitoring")  # logged in, but not as an operator: logging in again won't help
    assert refused.status_code == 403 and "for operators" in refused.get_data(as_text=True)
    make_user(monitored.test_cli_runner(), "ops", role="operator")
    login(client, "ops")
    page = client.get("/monitoring")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert "chi2_classes" in body and "mmd_embeddings" in body and "2000 held-out images" in body
    plot = client.get("/monitoring/1/drift.png")
    assert plot.status_code == 200 and plot.mimetype == "image/png"
    assert client.get("/monitoring/2/drift.png").status_code == 404
    metrics = client.get("/metrics").get_data(as_text=True)
    for gauge in ("imgcls_drift_estimated_accuracy", "imgcls_drift_unknown_rate", "imgcls_drift_min_p_value"):
        assert f'{gauge}{{model_id="1",name="seed",version="1"}}' in metrics


def test_import_stores_the_reference_beside_the_model(bare_app, seed_model_file, tmp_path):
    reference = Reference(tuple(f"c{i}" for i in range(10)), *_tiny_reference_parts(), source="test")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.h5").write_bytes(seed_model_file.read_bytes())
    (folder / REFERENCE_FILE).write_bytes(reference.to_bytes())
    with bare_app.app_context():
        model_store.init_db()
    runner = bare_app.test_cli_runner()
    other = runner.invoke(args=["models", "import", str(folder / "model.h5")])
    assert other.exit_code == 0 and "drift reference not stored" in other.output and "other classes" in other.output
    classes = ",".join(reference.class_names)
    result = runner.invoke(args=["models", "import", str(folder / "model.h5"), "--classes", classes])
    assert result.exit_code == 0 and "drift reference stored (50 held-out images)" in result.output, result.output
    with bare_app.app_context():
        (stored,) = [Reference.from_bytes(row.data) for row in db.session.scalars(select(DriftReference))]
        assert db.session.scalar(select(DriftReference.model_id)) == 2
    assert np.array_equal(stored.sample.classes, reference.sample.classes)


def _tiny_reference_parts():
    from monitoring.drift import Sample

    rng = np.random.default_rng(0)
    sample = Sample(
        classes=rng.integers(0, 10, 50),
        top_probability=rng.random(50),
        decisions=np.array(["confident"] * 50),
        ood_scores=rng.normal(size=50),
        statistics=rng.random((50, 4)),
        embeddings=None,
    )
    return sample, None


def test_flask_calibrate_fits_the_reference_on_the_same_held_out_images(app, runner, tmp_path):
    data = _folder(tmp_path / "data")
    refused = runner.invoke(args=["drift", "fit-reference", "1", "--data", str(data)])
    assert refused.exit_code == 1 and "the model is not calibrated" in refused.output
    result = runner.invoke(args=["calibrate", "1", "--data", str(data), "--val-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        summary = store.reference_summary(1)
        assert summary["images"] == model_store.get_calibration(1)["heldout_images"] == 20
        assert summary["source"].startswith("flask calibrate: data, 20 held-out images")
    out = tmp_path / "reference.safetensors"
    refit = runner.invoke(
        args=["drift", "fit-reference", "1", "--data", str(data), "--val-fraction", "0.5", "--out", out]
    )
    assert refit.exit_code == 0 and "drift reference of model 1: 20 held-out images" in refit.output, refit.output
    assert len(Reference.from_bytes(out.read_bytes()).sample) == 20
