"""The OOD threshold from the label queue's labels: what the ood and random lanes' labels support,
refusals on too few labels, applying it to a served model, and "none of these" kept out of the
training export."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
from helpers import classify, force_calibration, login, make_user, random_image_bytes, serve_registry

import model_store
import prediction_history
import serving
from accounts import Viewer
from database import db
from labelling import ood_store, store
from monitoring import store as drift_store
from monitoring.drift import IMAGE_STATISTICS, Sample
from monitoring.reference import Reference
from prediction_history import HistoryEntry

OPERATOR = Viewer(user_id=None, operator=True, name="op")
CURRENT = 2.0


def labelled(app, lane: str, feedback: str, scores) -> None:
    """Predictions of the active model with these OOD scores, asked about in `lane` of a round
    and labelled: "right", "wrong" (as another class) or "none"."""
    with app.app_context():
        model = model_store.get_active()
        label_round = store.LabelRound(created_at=datetime.now(UTC), model_id=model.id, requested=len(scores))
        db.session.add(label_round)
        db.session.flush()
        for position, score in enumerate(scores):
            row = HistoryEntry(
                created_at=datetime.now(UTC),
                model_id=model.id,
                model_name=model.name,
                model_version=model.version,
                source="api",
                filename=f"{lane}-{position}.png",
                top_class="cat",
                class_names=model.class_names,
                confidence=0.9,
                decision="unsure",
                ood_score=float(score),
                image_sha256=f"{lane}{feedback}{position}".ljust(64, "0"),
                feedback=feedback,
                correct_class="dog" if feedback == "wrong" else None,
                feedback_at=datetime.now(UTC),
                feedback_author="ann",
            )
            db.session.add(row)
            db.session.flush()
            db.session.add(
                store.LabelItem(
                    round_id=label_round.id,
                    prediction_id=row.id,
                    position=position,
                    lane=lane,
                    score=float(score),
                    labelled_at=datetime.now(UTC),
                    labelled_by="ann",
                )
            )
        db.session.commit()


def tune(runner, *options: str) -> dict:
    result = runner.invoke(args=["label-queue", "tune-ood", "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_in_scope_images_called_unknown_support_a_higher_threshold(app, runner):
    force_calibration(app, confidence_threshold=0.0, ood_threshold=CURRENT)
    # A fifth of the random lane's in-scope images score above the current threshold.
    labelled(app, "random", "right", np.linspace(-2.0, 4.0, 80))
    labelled(app, "random", "wrong", np.linspace(-1.0, 3.0, 20))
    labelled(app, "ood", "none", np.linspace(6.0, 9.0, 10))
    proposal = tune(runner)
    assert proposal["current"] == CURRENT and proposal["proposed"] > 3.5 and proposal["applied"] is False
    assert (proposal["in_scope_labels"], proposal["none_labels"]) == (100, 10)
    assert proposal["false_unknown_now"] > 0.15 and proposal["false_unknown_proposed"] <= 0.05
    assert proposal["caught_now"] == proposal["caught_proposed"] == 1.0


def test_none_of_these_images_let_through_support_a_lower_threshold(app, runner):
    force_calibration(app, confidence_threshold=0.0, ood_threshold=CURRENT)
    labelled(app, "random", "right", np.linspace(-3.0, 0.0, 100))
    # Images people call "none of these" that the model answers now; the random lane's are not in scope.
    labelled(app, "random", "none", np.linspace(0.5, 1.5, 5))
    labelled(app, "ood", "none", np.linspace(0.5, 1.9, 5))
    proposal = tune(runner)
    assert proposal["proposed"] < 0.0 < CURRENT and proposal["in_scope_labels"] == 100
    assert proposal["caught_now"] == 0.0 and proposal["caught_proposed"] == 1.0
    assert proposal["false_unknown_proposed"] <= 0.05
    text = runner.invoke(args=["label-queue", "tune-ood"]).output
    assert "OOD threshold 2.000 now" in text and "caught 0% now, 100% with it" in text


def test_too_few_labels_are_refused_and_nothing_changes(app, runner):
    force_calibration(app, confidence_threshold=0.0, ood_threshold=CURRENT)
    labelled(app, "random", "right", np.linspace(-3.0, 0.0, 99))
    # Labelled in the ood lane, in-scope images are the highest scores, no unbiased sample: not counted.
    labelled(app, "ood", "right", np.linspace(3.0, 4.0, 30))
    labelled(app, "ood", "none", np.linspace(5.0, 6.0, 9))
    with app.app_context():
        before = db.session.get(model_store.ModelCalibration, model_store.get_active().id).created_at
    result = runner.invoke(args=["label-queue", "tune-ood", "--apply"])
    assert result.exit_code != 0
    assert "too few labels to tune the OOD threshold: 99 of 100 in-scope labels" in result.output
    assert '9 of 10 "none of these" labels' in result.output
    with app.app_context():
        assert db.session.get(model_store.ModelCalibration, model_store.get_active().id).created_at == before
        assert ood_store.changes() == []


def test_an_uncalibrated_model_is_refused(app, runner):
    result = runner.invoke(args=["label-queue", "tune-ood"])
    assert result.exit_code != 0 and "has no OOD calibration to tune: run `flask calibrate` first" in result.output


def test_apply_changes_the_served_models_decisions_and_is_logged(app, client, runner):
    force_calibration(app, confidence_threshold=0.0, ood_threshold=1e9)
    image = random_image_bytes(7)
    (first,) = classify(client, image).get_json()["predictions"]
    assert first["decision"] == "confident"
    score = first["ood_score"]
    # The labels support a threshold under this image's score.
    labelled(app, "random", "right", np.linspace(score - 10, score - 5, 100))
    labelled(app, "ood", "none", np.linspace(score - 1, score + 1, 10))
    with app.app_context():
        key_before = serving.registry_assignments()[serving.CHAMPION]
    result = runner.invoke(args=["label-queue", "tune-ood", "--apply"])
    assert result.exit_code == 0, result.output
    assert "applied to model" in result.output and "serving workers reload it" in result.output
    with app.app_context():
        key_after = serving.registry_assignments()[serving.CHAMPION]
        (change,) = ood_store.changes()
        record = model_store.get_calibration(change.model_id)
    assert key_after[:2] == key_before[:2] and key_after[2] != key_before[2]
    assert change.author.startswith("cli") and change.old_threshold == 1e9
    assert (change.in_scope_labels, change.none_labels) == (100, 10)
    assert record["ood"]["threshold"] == change.new_threshold < score
    serve_registry(app)  # a worker's poller sees the new calibration time
    (second,) = classify(client, image).get_json()["predictions"]
    assert second["decision"] == "unknown" and abs(second["ood_score"] - score) < 1e-6
    # The labels still count after the change (its statistics are the fit's): tuning again is stable.
    again = tune(runner)
    assert again["current"] == again["proposed"] == change.new_threshold
    make_user(runner, "olga", role="operator")
    login(client, "olga")
    page = client.get("/label/queue").get_data(as_text=True)
    assert "supported by the labels" in page and f"{change.new_threshold:.3f}" in page and change.author in page


def test_applying_a_threshold_takes_the_drift_references_decisions_again(app, runner):
    # A reference whose OOD scores are known: after the threshold moves, its unknown rate is the
    # share above the new one, as the served decisions are (else drift monitoring would report
    # the change it was told about as a rise in unknowns).
    force_calibration(app, confidence_threshold=0.0, ood_threshold=CURRENT)
    scores = np.linspace(-4.0, 6.0, 101).astype(np.float32)
    sample = Sample(
        classes=np.zeros(101, np.int64),
        top_probability=np.full(101, 0.9),
        decisions=np.where(scores > CURRENT, "unknown", "confident"),
        ood_scores=scores.astype(np.float64),
        statistics=np.zeros((101, len(IMAGE_STATISTICS))),
        embeddings=None,
    )
    with app.app_context():
        model = model_store.get_active()
        drift_store.set_reference(model.id, Reference(tuple(model.class_names), sample, None, "test"))
        fitted_before = drift_store.references.get_fitted(model.id)[0]
    labelled(app, "random", "right", np.linspace(-3.0, 0.0, 100))
    labelled(app, "ood", "none", np.linspace(0.5, 1.9, 10))
    assert tune(runner, "--apply")["applied"] is True
    with app.app_context():
        threshold = model_store.get_calibration(model.id)["ood"]["threshold"]
        fitted_after, stored = drift_store.references.get_fitted(model.id)
        summary = drift_store.reference_summary(model.id)
    assert threshold < 0.0 and fitted_after > fitted_before  # its windows start again
    assert list(stored.sample.decisions) == ["unknown" if s > threshold else "confident" for s in scores]
    assert summary["unknown_rate"] == np.mean(scores > threshold) > np.mean(scores > CURRENT)


def test_a_new_calibration_makes_older_labels_stale(app, runner):
    force_calibration(app, confidence_threshold=0.0, ood_threshold=CURRENT)
    labelled(app, "random", "right", np.linspace(-3.0, 0.0, 100))
    labelled(app, "ood", "none", np.linspace(5.0, 6.0, 10))
    assert tune(runner, "--apply")["applied"] is True
    # A new fit standardises the score anew: the scores labelled before it are not comparable.
    force_calibration(app, confidence_threshold=0.0, ood_threshold=CURRENT)
    result = runner.invoke(args=["label-queue", "tune-ood"])
    assert result.exit_code != 0 and "0 of 100 in-scope labels" in result.output


def test_none_of_these_answers_never_become_training_data(app, client, runner, tmp_path):
    ids = [p["id"] for p in classify(client, *[random_image_bytes(s) for s in range(2)]).get_json()["predictions"]]
    with app.app_context():
        prediction_history.set_feedback(ids[0], "right", None)
        prediction_history.set_feedback(ids[1], "none", None)
        for prediction_id in ids:  # both held (against a "confident" answer) until an operator confirms
            store.decide(prediction_id, "confirm", OPERATOR)
        top = prediction_history.get(ids[0]).top_class
    result = runner.invoke(args=["export-feedback", str(tmp_path / "set")])
    assert result.exit_code == 0 and "wrote 1 images" in result.output, result.output
    written = sorted(path.relative_to(tmp_path / "set").as_posix() for path in (tmp_path / "set").rglob("*.jpg"))
    assert written == [f"{top}/{ids[0]}.jpg"]


def test_labels_an_operator_rejected_are_no_evidence(app, runner):
    force_calibration(app, confidence_threshold=0.0, ood_threshold=CURRENT)
    labelled(app, "random", "right", np.linspace(-3.0, 0.0, 100))
    labelled(app, "ood", "none", np.linspace(5.0, 6.0, 10))
    assert tune(runner)["none_labels"] == 10
    with app.app_context():
        (item,) = db.session.scalars(db.select(store.LabelItem).where(store.LabelItem.lane == "ood").limit(1))
        store.decide(item.prediction_id, "reject", OPERATOR)
    result = runner.invoke(args=["label-queue", "tune-ood"])
    assert result.exit_code != 0 and '9 of 10 "none of these" labels' in result.output
