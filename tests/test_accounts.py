"""Accounts, API keys and who sees what: anonymous browser sessions, members and operators."""

import re
from datetime import UTC, datetime, timedelta

import pytest
from helpers import bearer, classify, image_bytes, login, make_key, make_user, random_image_bytes, serve_registry
from sqlalchemy import select, text

import accounts
import prediction_history
from app import create_app
from database import db
from prediction_history import HistoryEntry


def predict_id(client, seed=0, **kwargs):
    response = classify(client, random_image_bytes(seed), **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    if response.is_json:
        return response.get_json()["predictions"][0]["id"]
    return int(re.search(r"/predictions/(\d+)/feedback", response.get_data(as_text=True)).group(1))


def test_users_cli_creates_lists_changes_and_deletes_with_hashed_passwords(app, runner):
    assert "created operator olga" in make_user(runner, "olga", "operator").output
    make_user(runner, "max")
    listed = runner.invoke(args=["users", "list"]).output
    assert re.search(r"max\s+member", listed) and re.search(r"olga\s+operator", listed)
    with app.app_context():
        stored = db.session.execute(text("SELECT password_hash FROM users WHERE name = 'max'")).scalar()
        assert "correct horse" not in stored and accounts.authenticate("max", "correct horse")
    refused = runner.invoke(args=["users", "create", "max", "--password-stdin"], input="another password\n")
    assert refused.exit_code == 1 and "exists already" in refused.output
    short = runner.invoke(args=["users", "create", "eve", "--password-stdin"], input="short\n")
    assert short.exit_code == 1 and "at least 8 characters" in short.output
    changed = runner.invoke(args=["users", "set-password", "max", "--password-stdin"], input="new password 1\n")
    assert changed.exit_code == 0
    with app.app_context():
        assert accounts.authenticate("max", "new password 1") and not accounts.authenticate("max", "correct horse")
    assert runner.invoke(args=["users", "delete", "max"]).exit_code == 0
    assert "max" not in runner.invoke(args=["users", "list"]).output
    assert runner.invoke(args=["users", "delete", "nobody"]).exit_code == 1


def test_users_create_prompts_for_the_password_twice(app, runner):
    result = runner.invoke(args=["users", "create", "pia"], input="pia password\npia password\n")
    assert result.exit_code == 0, result.output
    with app.app_context():
        assert accounts.authenticate("pia", "pia password").role == "member"


def test_login_and_logout(app, client, runner):
    make_user(runner, "max")
    page = client.get("/login")
    assert page.status_code == 200 and 'name="username"' in page.get_data(as_text=True)
    wrong = login(client, "max", "not the password")
    assert wrong.status_code == 401 and "wrong password" in wrong.get_data(as_text=True)
    assert login(client, "nobody").status_code == 401
    assert login(client, "max").status_code == 302
    assert "max" in client.get("/").get_data(as_text=True)
    assert client.post("/logout").status_code == 302
    assert "Log in" in client.get("/").get_data(as_text=True)


def test_api_key_is_printed_once_stored_as_a_hash_and_owns_its_predictions(app, runner):
    make_user(runner, "max")
    key = make_key(runner, "max")
    assert key.startswith(accounts.KEY_PREFIX) and len(key) > 40
    with app.app_context():
        stored = db.session.execute(text("SELECT prefix, key_sha256 FROM api_keys")).one()
        assert key not in stored and key[:12] == stored.prefix
    listed = runner.invoke(args=["api-keys", "list"]).output
    assert "script" in listed and "max" in listed and key not in listed
    prediction_id = predict_id(app.test_client(), headers=bearer(key))
    with app.app_context():
        assert prediction_history.get(prediction_id).owner_user_id == accounts.find_user("max").id
    assert runner.invoke(args=["api-keys", "revoke", "1"]).exit_code == 0
    refused = classify(app.test_client(), image_bytes(), headers=bearer(key))
    assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "unauthorized"
    assert classify(app.test_client(), image_bytes(), headers=bearer("ick_made_up")).status_code == 401
    assert runner.invoke(args=["api-keys", "create", "x", "--user", "nobody"]).exit_code == 1


def test_someone_elses_prediction_answers_404_everywhere(app):
    owner, stranger = app.test_client(), app.test_client()
    prediction_id = predict_id(owner, route="/")
    assert owner.get(f"/predictions/{prediction_id}/thumbnail.jpg").status_code == 200
    assert f'id="p{prediction_id}"' in owner.get("/history").get_data(as_text=True)
    assert stranger.get(f"/predictions/{prediction_id}/thumbnail.jpg").status_code == 404
    assert stranger.post(f"/predictions/{prediction_id}/feedback", data={"verdict": "right"}).status_code == 404
    assert stranger.post(f"/predictions/{prediction_id}/delete").status_code == 404
    history = stranger.get("/history").get_data(as_text=True)
    assert f'id="p{prediction_id}"' not in history and "0.png" not in history
    with app.app_context():
        row = prediction_history.get(prediction_id)
        assert row.feedback is None and row.owner_session and row.owner_user_id is None


def test_members_see_their_own_and_operators_see_all(app, runner):
    make_user(runner, "olga", "operator")
    make_user(runner, "max")
    make_user(runner, "mia")
    anonymous, max_client, mia_client, olga = (app.test_client() for _ in range(4))
    for client, name in ((max_client, "max"), (mia_client, "mia"), (olga, "olga")):
        login(client, name)
    ids = {
        "anonymous": predict_id(anonymous, 0),
        "max": predict_id(max_client, 1),
        "mia": predict_id(mia_client, 2),
    }

    def listed(client):
        return {int(i) for i in re.findall(r'id="p(\d+)"', client.get("/history").get_data(as_text=True))}

    assert listed(max_client) == {ids["max"]} and listed(mia_client) == {ids["mia"]}
    assert listed(anonymous) == {ids["anonymous"]}
    assert listed(olga) == set(ids.values())
    assert mia_client.get(f"/predictions/{ids['max']}/thumbnail.jpg").status_code == 404
    assert olga.get(f"/predictions/{ids['max']}/thumbnail.jpg").status_code == 200
    # Logging in moves the anonymous visitor's predictions into the account.
    login(anonymous, "mia")
    assert listed(anonymous) == {ids["mia"], ids["anonymous"]}


def test_feedback_records_its_author_and_others_cannot_overwrite_it(app, runner, tmp_path):
    make_user(runner, "olga", "operator")
    make_user(runner, "max")
    max_client, olga = app.test_client(), app.test_client()
    login(max_client, "max")
    login(olga, "olga")
    first, second = predict_id(max_client, 1), predict_id(max_client, 2)
    assert max_client.post(f"/predictions/{first}/feedback", data={"verdict": "right"}).status_code == 302
    assert olga.post(f"/predictions/{second}/feedback", data={"verdict": "right"}).status_code == 302
    locked = max_client.post(f"/predictions/{second}/feedback", data={"verdict": "wrong", "correct_class": "cat"})
    assert locked.status_code == 409 and "marked by olga" in locked.get_data(as_text=True)
    assert max_client.post(f"/predictions/{first}/feedback", data={"verdict": "right"}).status_code == 302
    with app.app_context():
        rows = {row.id: row for row in db.session.scalars(select(HistoryEntry))}
        assert (rows[first].feedback_author, rows[second].feedback_author) == ("max", "olga")
        assert rows[second].feedback == "right" and rows[first].feedback_at is not None
    assert runner.invoke(args=["export-feedback", str(tmp_path / "set")]).exit_code == 0
    lines = (tmp_path / "set" / "feedback.csv").read_text().splitlines()
    assert lines[0] == "file,class,author,marked_at" and {line.split(",")[2] for line in lines[1:]} == {"max", "olga"}


def test_people_delete_one_or_forget_all_of_their_predictions(app, runner):
    make_user(runner, "max")
    anonymous, max_client = app.test_client(), app.test_client()
    login(max_client, "max")
    kept = predict_id(max_client, 9)
    ids = [predict_id(anonymous, seed) for seed in range(3)]
    assert anonymous.post(f"/predictions/{ids[0]}/delete").status_code == 302
    assert anonymous.get(f"/predictions/{ids[0]}/thumbnail.jpg").status_code == 404
    forgotten = anonymous.post("/history/forget", follow_redirects=True).get_data(as_text=True)
    assert "2 of your predictions" in forgotten
    with app.app_context():
        assert [row.id for row in db.session.scalars(select(HistoryEntry))] == [kept]


def test_anonymous_access_can_be_turned_off(make_app, seed_model_file):
    app = make_app(ALLOW_ANONYMOUS=False, ALLOW_ANONYMOUS_API=False)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["init-db"]).exit_code == 0
    assert runner.invoke(args=["models", "import", str(seed_model_file), "--activate"]).exit_code == 0
    serve_registry(app)
    client = app.test_client()
    response = client.get("/history")
    assert response.status_code == 302 and "/login" in response.headers["Location"]
    assert client.get("/login").status_code == 200
    refused = classify(client, image_bytes())
    assert refused.status_code == 401 and "API key" in refused.get_json()["error"]["message"]
    make_user(runner, "max")
    assert classify(client, image_bytes(), headers=bearer(make_key(runner, "max"))).status_code == 200
    login(client, "max")
    assert client.get("/history").status_code == 200


def test_metrics_for_loopback_operators_and_the_token(app, runner):
    app.config["METRICS_TOKEN"] = "prometheus-secret"
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    client = app.test_client()
    assert client.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    assert client.get("/metrics", environ_base=remote).status_code == 401
    assert client.get("/metrics", environ_base=remote, headers=bearer("guess")).status_code == 401
    assert client.get("/metrics", environ_base=remote, headers=bearer("prometheus-secret")).status_code == 200
    make_user(runner, "olga", "operator")
    make_user(runner, "max")
    member, operator = app.test_client(), app.test_client()
    login(member, "max")
    login(operator, "olga")
    assert member.get("/metrics", environ_base=remote).status_code == 401
    assert operator.get("/metrics", environ_base=remote).status_code == 200
    app.config["METRICS_ALLOW_LOOPBACK"] = False
    assert client.get("/metrics").status_code == 401


def test_retention_purge_by_command_and_at_most_hourly_by_the_app(app, runner, client):
    old_id, new_id = predict_id(client, 1), predict_id(client, 2)
    with app.app_context():
        prediction_history.get(old_id).created_at = datetime.now(UTC) - timedelta(days=31)
        db.session.commit()
    result = runner.invoke(args=["purge-history"])
    assert result.exit_code == 0 and "deleted 1 predictions older than 30 days" in result.output
    with app.app_context():
        assert [row.id for row in db.session.scalars(select(HistoryEntry))] == [new_id]
        prediction_history.get(new_id).created_at = datetime.now(UTC) - timedelta(days=40)
        db.session.commit()
    purge = app.extensions["history_purge"]
    purge._last = None  # as in a worker that has not purged yet
    client.get("/healthz")
    later_id = predict_id(client, 3)
    with app.app_context():
        assert [row.id for row in db.session.scalars(select(HistoryEntry))] == [later_id]
        prediction_history.get(later_id).created_at = datetime.now(UTC) - timedelta(days=40)
        db.session.commit()
    client.get("/healthz")  # within the hour: no second purge
    with app.app_context():
        assert db.session.get(HistoryEntry, later_id) is not None


@pytest.mark.parametrize(
    ("bind", "settings", "refused"),
    [
        ("0.0.0.0:8000", {}, True),
        ("[::]:8000", {"ALLOW_ANONYMOUS": False}, True),
        ("0.0.0.0:8000", {"ALLOW_ANONYMOUS": False, "ALLOW_ANONYMOUS_API": False}, False),
        ("0.0.0.0:8000", {"ALLOW_ANONYMOUS": True, "ALLOW_ANONYMOUS_API": True}, False),
        ("127.0.0.1:8000,[::1]:8000,unix:/tmp/app.sock", {}, False),
        ("localhost:8000", {}, False),
    ],
)
def test_an_exposed_server_refuses_anonymous_access_left_at_its_default(monkeypatch, tmp_path, bind, settings, refused):
    monkeypatch.setenv("SERVER_BIND", bind)
    config = {"INSTANCE_PATH": str(tmp_path / "i"), "SECRET_KEY": "x", **settings}
    config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path / 'db.sqlite'}"
    if refused:
        with pytest.raises(RuntimeError, match=r"refusing to serve on .*anonymous access is on by default"):
            create_app(config)
    else:
        assert create_app(config).config["ALLOW_ANONYMOUS_API"] is settings.get("ALLOW_ANONYMOUS_API")


def test_init_db_prints_the_database_url_without_its_password(tmp_path, monkeypatch):
    url = "postgresql+psycopg://imgcls:s3cret-pw@127.0.0.1:1/imgcls"
    app = create_app({"INSTANCE_PATH": str(tmp_path / "i"), "SECRET_KEY": "x", "SQLALCHEMY_DATABASE_URI": url})
    # No server listens on port 1: the command's printing is under test, not the migration.
    monkeypatch.setattr("model_store.init_db", lambda: None)
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    assert "s3cret-pw" not in result.output and "imgcls:***@127.0.0.1:1/imgcls" in result.output
