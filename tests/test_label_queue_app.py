"""The label queue in the app: rounds built from the history with the served model, the
commands, the held feedback and the export of confirmed labels only."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
from helpers import classify, one_hot, random_image_bytes

import prediction_history
from accounts import Viewer
from database import db
from labelling import queue, store
from prediction_history import HistoryEntry, ModelOutput


def unlike(ids: list[int]) -> np.ndarray:
    """Features no two predictions share (one-hot)."""
    return one_hot(ids, 1000)


OPERATOR = Viewer(user_id=None, operator=True, name="op")


def predict(client, *seeds: int) -> list[int]:
    body = classify(client, *[random_image_bytes(seed) for seed in seeds]).get_json()
    return [p["id"] for p in body["predictions"]]


def listed(runner) -> dict:
    result = runner.invoke(args=["label-queue", "list", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_predictions_keep_their_calibrated_probabilities(app, client):
    (prediction_id,) = predict(client, 1)
    with app.app_context():
        row = prediction_history.get(prediction_id)
        probabilities = store.probabilities_of(row)
        assert list(probabilities) == row.class_names and abs(sum(probabilities.values()) - 1) < 1e-4
        assert max(probabilities, key=probabilities.get) == row.top_class
        assert probabilities[row.top_class] == row.confidence


def test_build_and_list_a_round_one_item_per_image(app, client, runner):
    ids = predict(client, 1, 2, 3, 4, 5, 1)  # the last is the first image again: same hash
    with app.app_context():
        prediction_history.set_feedback(ids[4], "right", None)  # marked already: not asked again
    result = runner.invoke(args=["label-queue", "build", "--size", "10", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert "4 of 10 items" in result.output and "fewer than asked" in result.output
    body = listed(runner)
    items = body["items"]
    assert {tuple(sorted(item)) for item in items} == {
        ("filename", "labelled_by", "predicted", "prediction_id", "reason", "score")
    }
    chosen = {item["prediction_id"] for item in items}
    assert len(chosen & {ids[0], ids[5]}) == 1 and ids[4] not in chosen and len(chosen) == 4
    assert {item["reason"] for item in items} <= {"random", "ood", "margin"}
    text = runner.invoke(args=["label-queue", "list"]).output
    assert f"round {body['round']}" in text and items[0]["reason"] in text


def test_the_shadow_lane_holds_the_predictions_the_challenger_answered_otherwise(app, client):
    ids = predict(client, *range(12))
    with app.app_context():
        rows = [prediction_history.get(i) for i in ids]
        # A canary's champion answer is no shadow disagreement, nor is a challenger that agrees.
        for row, other, role in (
            (rows[2], True, "challenger"),
            (rows[7], True, "challenger"),
            (rows[9], False, "challenger"),
            (rows[4], True, "champion"),
        ):
            answer = next(c for c in row.class_names if c != row.top_class) if other else row.top_class
            db.session.add(
                ModelOutput(
                    prediction_id=row.id,
                    model_id=None,
                    model_name="challenger",
                    model_version=2,
                    role=role,
                    created_at=datetime.now(UTC),
                    top_class=answer,
                    confidence=0.9,
                    probabilities=[],
                )
            )
        db.session.commit()
        shadow = queue.ranked_lanes(store.candidates(), np.random.default_rng(0))["shadow"]
    assert {item.prediction_id for item in shadow} == {ids[2], ids[7]}


def test_build_needs_a_served_model(app, runner):
    with app.app_context():
        db.session.execute(db.update(store.LabelRound).values(requested=1))  # nothing there; just a session
        from model_store import ModelVersion

        db.session.execute(db.update(ModelVersion).values(is_active=False))
        db.session.commit()
    result = runner.invoke(args=["label-queue", "build"])
    assert result.exit_code != 0 and "no model is active" in result.output
    assert "no round yet" in runner.invoke(args=["label-queue", "list"]).output


def test_export_holds_back_a_label_against_a_confident_prediction_until_confirmed(app, client, runner, tmp_path):
    ids = predict(client, 1, 2)
    with app.app_context():
        # The seed-like model is uncalibrated: every answer it gives is "confident".
        rows = [prediction_history.get(i) for i in ids]
        assert {row.decision for row in rows} == {"confident"}
        prediction_history.set_feedback(ids[0], "right", None)
        other = next(c for c in rows[1].class_names if c != rows[1].top_class)
        prediction_history.set_feedback(ids[1], "wrong", other)
        assert [row.id for row, _review in store.held()] == [ids[1]]
    result = runner.invoke(args=["export-feedback", str(tmp_path / "first")])
    assert "held back 1 marked predictions (1 held)" in result.output and "wrote 1 images" in result.output
    assert not (tmp_path / "first" / other / f"{ids[1]}.jpg").exists()
    # The held label joins the next round's conflict lane, for a second person.
    assert runner.invoke(args=["label-queue", "build", "--size", "10", "--seed", "0"]).exit_code == 0
    conflict = [item["prediction_id"] for item in listed(runner)["items"] if item["reason"] == "conflict"]
    assert conflict == [ids[1]]
    with app.app_context():
        store.decide(ids[1], "confirm", OPERATOR)
        assert store.held() == []
    result = runner.invoke(args=["export-feedback", str(tmp_path / "second")])
    assert "held back" not in result.output and "wrote 2 images" in result.output
    with app.app_context():
        store.decide(ids[1], "reject", OPERATOR)
    result = runner.invoke(args=["export-feedback", str(tmp_path / "third")])
    assert "held back 1 marked predictions (1 rejected)" in result.output


def test_a_second_person_who_agrees_confirms_held_feedback(app, client):
    (prediction_id,) = predict(client, 3)
    with app.app_context():
        row = prediction_history.get(prediction_id)
        other = next(c for c in row.class_names if c != row.top_class)
        prediction_history.set_feedback(prediction_id, "wrong", other, Viewer(user_id=None, operator=True, name="ann"))
        label_round = store.build(10, unlike, None, 0)
        (item,) = [item for item, _ in store.round_items(label_round) if item.prediction_id == prediction_id]
        assert item.lane == "conflict"
        store.answer(item.id, other, Viewer(user_id=None, operator=True, name="bob"))
        # A second opinion does not overwrite the first person's feedback.
        row = db.session.get(HistoryEntry, prediction_id)
        assert (row.feedback, row.correct_class, row.feedback_author) == ("wrong", other, "ann")
        assert store.reviews()[prediction_id].reason == "a second person agreed"


def test_the_summary_counts_each_lanes_labels_right_and_none(app, client, runner):
    ids = predict(client, *range(8))
    with app.app_context():
        label_round = store.build(8, unlike, None, 0)
        pairs = store.round_items(label_round)
        (first, row), (second, _row) = pairs[0], pairs[1]
        store.answer(first.id, row.top_class, OPERATOR)
        store.answer(second.id, "none", OPERATOR)
        lanes = {lane.lane: lane for lane in store.summary(label_round)}
        assert sum(lane.items for lane in lanes.values()) == len(pairs) <= len(ids)
        assert (lanes[first.lane].labelled, lanes[first.lane].right) >= (1, 1)
        assert sum(lane.none for lane in lanes.values()) == 1 and lanes[second.lane].none == 1
    text = runner.invoke(args=["label-queue", "list"]).output
    assert "labelled by op" in text
