"""Champion and challenger through the real app: the recorded activations and the audit, canary
routing by the upload's hash, shadow answers that never reach the person, the off-path queue,
an automatic rollback, the Models page's buttons, /metrics, and two instances following the state."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import pytest
from helpers import classify, make_user, random_image_bytes, serve_registry
from sqlalchemy import select

import model_store
from database import db
from prediction_history import HistoryEntry, ModelOutput, RolloutObservation
from rollout import checks as rollout_checks
from rollout import state as rollout_state
from web.extensions import model_serving


def _import(app, path, name="challenger") -> int:
    with app.app_context():
        return model_store.import_model(path, name=name).id


def _worker(app):
    return app.extensions["rollout"].worker


def _ask(client, seed: int) -> dict:
    response = classify(client, random_image_bytes(seed))
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def _sha(seed: int) -> str:
    return model_store.sha256_of(random_image_bytes(seed))


def _events(app) -> list[dict]:
    with app.app_context():
        return [event.to_dict() for event in rollout_state.events()]


def test_activate_is_recorded_and_the_audit_names_who_served(app, runner, other_model_file):
    other = _import(app, other_model_file)
    before = datetime.now(UTC)
    result = runner.invoke(args=["models", "activate", str(other)])
    assert result.exit_code == 0, result.output
    (event,) = _events(app)
    assert event["action"] == "activate" and event["actor"].startswith("cli")
    assert event["from"].startswith("seed v1") and event["to"].startswith("challenger v1")
    audit = runner.invoke(args=["models", "audit", "--json"])
    assert json.loads(audit.output)[0]["action"] == "activate"
    at_before = json.loads(runner.invoke(args=["models", "audit", "--at", before.isoformat(), "--json"]).output)
    now = json.loads(runner.invoke(args=["models", "audit", "--at", datetime.now(UTC).isoformat(), "--json"]).output)
    assert at_before["champion_id"] == 1 and now["champion_id"] == other
    listed = runner.invoke(args=["models", "audit"]).output
    assert "activate" in listed and "seed v1 (id 1) -> challenger v1" in listed
    bad = runner.invoke(args=["models", "audit", "--at", "yesterday"])
    assert bad.exit_code != 0 and "not an ISO time" in bad.output


def test_a_canary_answers_its_share_by_the_uploads_hash_and_the_champion_scores_those_off_the_path(
    app, client, runner, other_model_file
):
    other = _import(app, other_model_file)
    assert runner.invoke(args=["models", "canary", str(other), "--share", "50"]).exit_code == 0
    serve_registry(app)
    answered = {seed: _ask(client, seed) for seed in range(12)}
    assert _worker(app).wait_idle()
    expected = {seed: other if rollout_checks.goes_to_challenger(_sha(seed), 50) else 1 for seed in answered}
    assert {seed: body["model"]["id"] for seed, body in answered.items()} == expected
    assert set(expected.values()) == {1, other}  # both answered some
    with app.app_context():
        history = {row.id: row.model_id for row in db.session.scalars(select(HistoryEntry))}
        outputs = {(row.prediction_id, row.model_id, row.role) for row in db.session.scalars(select(ModelOutput))}
    for seed, body in answered.items():
        prediction_id = body["predictions"][0]["id"]
        assert history[prediction_id] == expected[seed]
        scored_by_champion = (prediction_id, 1, "champion") in outputs
        assert scored_by_champion == (expected[seed] == other)
    page = client.post("/", data={"image": (__import__("io").BytesIO(random_image_bytes(3)), "x.png")})
    assert "challenger v1" in page.get_data(as_text=True) or expected[3] == 1


def test_shadow_answers_never_reach_the_person_nor_change_the_history(app, client, runner, other_model_file):
    other = _import(app, other_model_file)
    assert runner.invoke(args=["models", "shadow", str(other), "--sample", "1"]).exit_code == 0
    serve_registry(app)
    bodies = [_ask(client, seed) for seed in range(6)]
    assert _worker(app).wait_idle()
    assert {body["model"]["id"] for body in bodies} == {1}
    with app.app_context():
        for body in bodies:
            prediction = body["predictions"][0]
            row = db.session.get(HistoryEntry, prediction["id"])
            assert (row.model_id, row.top_class, row.confidence) == (
                1,
                prediction["top_class"],
                prediction["probability"],
            )
            (output,) = db.session.scalars(select(ModelOutput).where(ModelOutput.prediction_id == row.id))
            assert (output.model_id, output.role) == (other, "challenger")
    compare = json.loads(runner.invoke(args=["models", "compare", "--json"]).output)
    assert compare["mode"] == "shadow" and compare["paired"]["requests"] == 6
    text = runner.invoke(args=["models", "compare"]).output
    assert "shadow (sample 1)" in text and "paired     6 requests" in text and "confident conflicts  " in text


@contextmanager
def held_challenger(app) -> Iterator[threading.Event]:
    """Hold the challenger's off-path scoring until the block ends; the event is set once a
    job is held in it."""
    release, started = threading.Event(), threading.Event()
    challenger = app.extensions["model_serving"].slots.slot("challenger")
    original = challenger.score

    def held(decoded):
        started.set()
        release.wait(10)
        return original(decoded)

    object.__setattr__(challenger, "score", held)  # this one model only (LoadedModel is frozen)
    try:
        yield started
    finally:
        release.set()
        object.__delattr__(challenger, "score")


def test_a_canary_answers_map_is_drawn_by_the_challenger_that_made_it(app, client, runner, other_model_file):
    other = _import(app, other_model_file)
    runner.invoke(args=["models", "canary", str(other), "--share", "100"])
    serve_registry(app)
    (prediction,) = _ask(client, 0)["predictions"]
    page = client.get(f"/predictions/{prediction['id']}/explain")
    assert page.status_code == 200
    text = " ".join(page.get_data(as_text=True).split())
    assert "The map is drawn by challenger v1" in text and "not the version that made the prediction" not in text
    runner.invoke(args=["models", "rollback"])
    serve_registry(app)  # the challenger is no longer served: the champion draws it, and says so
    text = " ".join(client.get(f"/predictions/{prediction['id']}/explain").get_data(as_text=True).split())
    assert "The map is drawn by seed v1" in text and "not the version that made the prediction" in text


def test_a_full_off_path_queue_drops_the_job_and_counts_it_without_waiting(app, client, runner, other_model_file):
    other = _import(app, other_model_file)
    runner.invoke(args=["models", "shadow", str(other)])
    serve_registry(app)
    worker = _worker(app)
    with held_challenger(app) as started:
        _ask(client, 0)  # taken by the thread, held in the challenger's scoring
        assert started.wait(10)
        for seed in range(1, 80):
            _ask(client, seed)  # answered at once: the full queue drops, never waits
    assert worker.counts["dropped"] == 79 - 64  # the queue holds 64; the 65th on is dropped
    assert worker.wait_idle()


def test_a_prediction_deleted_before_its_shadow_answer_is_written_keeps_the_requests_observations(
    app, client, runner, other_model_file
):
    other = _import(app, other_model_file)
    runner.invoke(args=["models", "shadow", str(other)])
    serve_registry(app)
    worker = _worker(app)
    with held_challenger(app) as started:
        (prediction,) = _ask(client, 0)["predictions"]
        assert started.wait(10)
        # Its owner deletes it while the challenger still scores it off the path.
        assert client.post(f"/predictions/{prediction['id']}/delete").status_code == 302
    assert worker.wait_idle()
    assert worker.counts["failed"] == 0 and worker.counts["done"] == 1
    with app.app_context():
        observed = db.session.scalars(select(RolloutObservation.model_id)).all()
        assert sorted(observed) == [1, other] and db.session.scalar(select(ModelOutput.id)) is None


def test_a_challenger_that_fails_answers_nothing_the_champion_answers_and_the_failure_counts(
    app, client, runner, other_model_file
):
    other = _import(app, other_model_file)
    runner.invoke(args=["models", "canary", str(other), "--share", "100"])
    serve_registry(app)
    challenger = app.extensions["model_serving"].slots.slot("challenger")

    def broken(decoded):
        raise RuntimeError("the challenger's engine broke")

    object.__setattr__(challenger, "score", broken)
    try:
        body = _ask(client, 0)
    finally:
        object.__delattr__(challenger, "score")
    assert body["model"]["id"] == 1
    assert _worker(app).wait_idle()
    compare = json.loads(runner.invoke(args=["models", "compare", "--json"]).output)
    assert (compare["challenger"]["errors"], compare["challenger"]["requests"]) == (1, 1)
    assert compare["checks"][0]["name"] == "errors" and compare["checks"][0]["verdict"] == "FAIL"


def test_a_challenger_that_disagrees_is_rolled_back_automatically_and_the_event_written(
    app, client, runner, other_model_file
):
    other = _import(app, other_model_file)
    result = runner.invoke(args=["models", "canary", str(other), "--share", "100", "--check-every", "10"])
    assert result.exit_code == 0, result.output
    serve_registry(app)
    for seed in range(40):
        _ask(client, seed)
        assert _worker(app).wait_idle()
    events = _events(app)
    assert [event["action"] for event in events] == ["start-canary", "rollback"]
    assert events[-1]["actor"] == "system" and "3 failed checks in a row" in events[-1]["reason"]
    with app.app_context():
        assert rollout_state.get_state().mode == "off"
        snapshot = rollout_state.events()[-1].snapshot
    assert any(check["verdict"] == "FAIL" for check in snapshot["checks"])
    serve_registry(app)
    assert _ask(client, 99)["model"]["id"] == 1


def test_which_version_answered_is_right_for_every_prediction_after_a_scripted_sequence(
    app, client, runner, other_model_file, three_class_model_file
):
    other = _import(app, other_model_file)
    steps = [
        ["models", "canary", str(other), "--share", "40"],
        ["models", "promote"],
        ["models", "canary", "1", "--share", "60"],
        ["models", "rollback", "--reason", "scripted"],
        ["models", "shadow", "1", "--sample", "1"],
        ["models", "activate", "1"],
        ["models", "canary", str(other), "--share", "30"],
    ]
    seed = 0
    for args in [None, *steps]:
        if args:
            result = runner.invoke(args=args)
            assert result.exit_code == 0, result.output
        serve_registry(app)
        for _ in range(6):
            _ask(client, seed)
            seed += 1
    assert _worker(app).wait_idle()
    with app.app_context():
        rows = list(db.session.scalars(select(HistoryEntry)))
        assert len(rows) == 48
        served = [rollout_state.served_at(row.created_at, row.image_sha256).answered_by_id for row in rows]
        assert served == [row.model_id for row in rows]
        assert len({row.model_id for row in rows}) == 2
    assert [event["action"] for event in _events(app)] == [
        "start-canary",
        "promote",
        "start-canary",
        "rollback",
        "start-shadow",
        "activate",
        "start-canary",
    ]


def _token(client) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").get_data(as_text=True)).group(1)


def test_the_models_page_shows_the_comparison_and_buttons_to_operators_only(make_served_app, other_model_file):
    app = make_served_app(WTF_CSRF_ENABLED=True)
    runner = app.test_cli_runner()
    other = _import(app, other_model_file)
    runner.invoke(args=["models", "canary", str(other), "--share", "10"])
    make_user(runner, "op", role="operator")
    make_user(runner, "member")
    member = app.test_client()
    member.post("/login", data={"username": "member", "password": "correct horse", "csrf_token": _token(member)})
    page = member.get("/models").get_data(as_text=True)
    assert "Challenger: challenger v1" in page and "Promote the challenger" not in page
    # A member is refused (403), not asked to log in (401) as the anonymous are.
    assert member.post("/models/promote", data={"csrf_token": _token(member)}).status_code == 403
    anonymous = app.test_client()
    assert anonymous.post("/models/promote", data={"csrf_token": _token(anonymous)}).status_code == 401
    operator = app.test_client()
    operator.post("/login", data={"username": "op", "password": "correct horse", "csrf_token": _token(operator)})
    page = operator.get("/models").get_data(as_text=True)
    assert "Promote the challenger" in page and "confident conflicts" in page
    assert operator.post("/models/rollback").status_code == 400  # no CSRF token: refused
    with app.app_context():
        assert rollout_state.get_state().mode == "canary" and model_store.get_active().id == 1
    assert operator.post("/models/rollback", data={"csrf_token": _token(operator)}).status_code == 302
    with app.app_context():
        assert rollout_state.get_state().mode == "off"
    assert _events(app)[-1]["actor"] == "op" and _events(app)[-1]["action"] == "rollback"


def test_metrics_name_the_version_that_answered(app, client, runner, other_model_file):
    other = _import(app, other_model_file)
    runner.invoke(args=["models", "canary", str(other), "--share", "100"])
    serve_registry(app)
    _ask(client, 0)
    assert _worker(app).wait_idle()
    text = client.get("/metrics").get_data(as_text=True)
    answered = f'model_id="{other}",name="challenger",path="answered",role="challenger",version="1"'
    assert f'imgcls_rollout_answers_total{{decision="confident",{answered}}}' in text  # counts are per process
    assert (
        'imgcls_rollout_answers_total{decision="confident",model_id="1",name="seed",path="scored",role="champion"'
        in text
    )


def test_two_instances_follow_start_step_and_rollback_within_the_poll_interval(app, make_app, other_model_file):
    """Two apps on one database, each with its own registry poller (every 50 ms), as two
    instances (or two workers) run: each follows the state on its own, nobody refreshes them."""
    other = _import(app, other_model_file)
    polled = [make_app(instance=f"polled{i}", MODEL_POLL_SECONDS=0.05) for i in range(2)]
    for each in polled:
        model_serving.start(each, wait_seconds=30)

    def followed(mode: str, share: float) -> bool:
        deadline = time.monotonic() + 20  # a load takes a while on a busy machine; the poll is 50 ms
        while time.monotonic() < deadline:
            plans = [each.extensions["rollout"].plan for each in polled]
            slots = [each.extensions["model_serving"].slots.slot("challenger") for each in polled]
            loaded = [(slot.id if slot else None) for slot in slots]
            if (
                all((plan.mode, plan.share) == (mode, share) for plan in plans)
                and loaded == [other if mode != "off" else None] * 2
            ):
                return True
            time.sleep(0.02)
        return False

    try:
        with app.app_context():
            rollout_state.start_canary(other, 5.0, "test")
        assert followed("canary", 5.0)
        with app.app_context():
            rollout_state.step(25.0, "test")
        assert followed("canary", 25.0)
        with app.app_context():
            rollout_state.rollback("test", "done")
        assert followed("off", 0.0)
    finally:
        for each in polled:
            model_serving.stop(each)


@pytest.mark.parametrize("args", [["canary", "1", "--share", "5"], ["canary", "999", "--share", "5"], ["promote"]])
def test_bad_rollout_commands_say_why(runner, args):
    result = runner.invoke(args=["models", *args])
    assert result.exit_code != 0 and "Error" in result.output


def test_the_running_challenger_is_not_deleted_until_rolled_back(app, client, runner, other_model_file):
    # Deleted mid-canary, the state still named it: the audit said it answered the requests the
    # champion answered after the deletion.
    other = _import(app, other_model_file)
    assert runner.invoke(args=["models", "canary", str(other), "--share", "100"]).exit_code == 0
    refused = runner.invoke(args=["models", "delete", str(other)])
    assert refused.exit_code != 0 and f"model {other} is the challenger (canary)" in refused.output
    with app.app_context():
        assert model_store.get_model(other).id == other
    assert runner.invoke(args=["models", "rollback"]).exit_code == 0
    assert runner.invoke(args=["models", "delete", str(other)]).exit_code == 0
    serve_registry(app)
    _ask(client, 0)
    with app.app_context():
        row = db.session.scalars(select(HistoryEntry)).one()
        assert rollout_state.served_at(row.created_at, row.image_sha256).answered_by_id == row.model_id == 1
