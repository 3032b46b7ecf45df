"""The features working together through the real app: a canary's challenger answers through the
engine and its drift samples are its own; a shadow challenger's answers reach the label queue's
shadow lane; deleting a prediction, forgetting an owner and the retention purge leave no row of
the model outputs, drift samples or label items behind (SQLite with its foreign keys, PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from helpers import classify, fitted_calibration, random_image_bytes, serve_registry
from sqlalchemy import func, select

import model_store
import prediction_history
from accounts import Viewer
from database import db
from labelling import store as label_store
from labelling.store import LabelItem
from monitoring import store as drift_store
from monitoring.store import DriftSample
from prediction_history import HistoryEntry, ModelOutput, RolloutObservation

OPERATOR = Viewer(operator=True, name="op")


def calibrate_with_reference(app, model_id: int) -> int:
    """Calibrate a version on random images and store its drift reference; the reference's dimensions."""
    with app.app_context():
        row = model_store.get_model(model_id)
        record, reference = fitted_calibration(app, row, images=400, reference_images=600)
        model_store.set_calibration(row.id, record)
        drift_store.set_reference(row.id, reference)
        return len(reference.pca.components)


def ask(app, client, seeds) -> list[int]:
    ids = []
    for seed in seeds:
        response = classify(client, random_image_bytes(seed))
        assert response.status_code == 200, response.get_json()
        ids.append(response.get_json()["predictions"][0]["id"])
    assert app.extensions["rollout"].worker.wait_idle()
    return ids


def rows_by_prediction(model) -> dict[int, list]:
    found: dict[int, list] = {}
    for row in db.session.scalars(select(model)):
        found.setdefault(row.prediction_id, []).append(row)
    return found


@pytest.fixture
def canary_then_shadow(app, runner, other_model_file):
    """Four predictions the challenger answered as a canary (one browser), then four the champion
    answered while the challenger scored them in the shadow (another browser)."""
    with app.app_context():
        challenger = model_store.import_model(other_model_file, name="challenger").id
    dimensions = {model_id: calibrate_with_reference(app, model_id) for model_id in (1, challenger)}
    assert runner.invoke(args=["models", "canary", str(challenger), "--share", "100"]).exit_code == 0
    serve_registry(app)
    canary_client, shadow_client = app.test_client(), app.test_client()
    canary = ask(app, canary_client, range(4))
    assert runner.invoke(args=["models", "shadow", str(challenger), "--sample", "1"]).exit_code == 0
    serve_registry(app)
    shadow = ask(app, shadow_client, range(4, 8))
    return app, challenger, dimensions, canary, shadow


def test_drift_samples_and_outputs_belong_to_the_version_that_answered_or_scored(canary_then_shadow):
    app, challenger, dimensions, canary, shadow = canary_then_shadow
    with app.app_context():
        answered = {row.id: row.model_id for row in db.session.scalars(select(HistoryEntry))}
        samples = rows_by_prediction(DriftSample)
        outputs = rows_by_prediction(ModelOutput)
    assert {answered[i] for i in canary} == {challenger} and {answered[i] for i in shadow} == {1}
    for prediction_id, model_id in answered.items():
        (sample,) = samples[prediction_id]
        assert sample.model_id == model_id and len(sample.embedding) == dimensions[model_id]
        (output,) = outputs[prediction_id]
        # Behind a canary the champion scores off the path; in the shadow, the challenger.
        expected = (1, "champion") if model_id == challenger else (challenger, "challenger")
        assert (output.model_id, output.role) == expected


def test_the_shadow_lane_reads_the_shadow_challengers_answers(canary_then_shadow):
    app, _challenger, _dimensions, canary, shadow = canary_then_shadow
    with app.app_context():
        outputs = {pid: rows[0].top_class for pid, rows in rows_by_prediction(ModelOutput).items()}
        candidates = {c.prediction_id: c.challenger_class for c in label_store.candidates()}
    assert {pid: candidates[pid] for pid in shadow} == {pid: outputs[pid] for pid in shadow}
    assert {candidates[pid] for pid in canary} == {None}  # a canary's champion answer is no shadow's


def test_deleting_forgetting_and_purging_predictions_leave_nothing_of_them(canary_then_shadow):
    app, _challenger, _dimensions, canary, shadow = canary_then_shadow
    runner = app.test_cli_runner()
    assert runner.invoke(args=["label-queue", "build", "--size", "8", "--seed", "0"]).exit_code == 0

    def orphans() -> dict[str, list[int]]:
        """Per table, the prediction ids it still holds of predictions that are gone."""
        kept = set(db.session.scalars(select(HistoryEntry.id)))
        found = {
            m.__tablename__: set(db.session.scalars(select(m.prediction_id)))
            for m in (ModelOutput, DriftSample, LabelItem)
        }
        return {table: sorted(ids - kept) for table, ids in found.items() if ids - kept}

    with app.app_context():
        assert set(db.session.scalars(select(LabelItem.prediction_id))) & set(canary) and orphans() == {}
        prediction_history.delete_prediction(canary[0], OPERATOR)
        assert orphans() == {}
        owner = db.session.get(HistoryEntry, canary[1]).owner_session
        assert prediction_history.forget(Viewer(session_id=owner)) == 3
        assert orphans() == {}
        observations = select(func.count()).select_from(RolloutObservation)
        assert db.session.scalar(observations) > 0  # the canary's latencies, kept no longer than its answers
        assert prediction_history.purge(1) == 0  # all made today: none older than a day
        assert db.session.scalar(observations) > 0
        assert prediction_history.purge(1, now=datetime.now(UTC) + timedelta(days=2)) == len(shadow)
        assert orphans() == {} and db.session.scalar(select(HistoryEntry.id)) is None
        assert db.session.scalar(observations) == 0
