"""Sessions and what they may do (issue 20): cookies bound to a per-account token that log-out,
new passwords, roles, disabling and deletion end; ids never reused; the session lifetime;
log-in lockout and password hashes; API keys on the API and /metrics only; the anonymous owner
cookie and its predictions at log-in; purging with RETENTION_DAYS=0; control characters; caches;
public metrics."""

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from flask_migrate import upgrade
from helpers import bearer, classify, login, make_key, make_user, random_image_bytes, serve_registry
from itsdangerous import TimestampSigner
from sqlalchemy import select, text
from werkzeug.security import generate_password_hash

import accounts
import model_store
import prediction_history
from database import db
from prediction_history import HistoryEntry
from web.auth import ANONYMOUS_COOKIE, api_key_state


def predict_id(client, seed=0, **kwargs) -> int:
    response = classify(client, random_image_bytes(seed), **kwargs)
    assert response.status_code == 200, response.get_data(as_text=True)
    if response.is_json:
        return response.get_json()["predictions"][0]["id"]
    return int(re.search(r"/predictions/(\d+)/feedback", response.get_data(as_text=True)).group(1))


def who(client) -> str:
    """The account name the header shows, or "anonymous"."""
    found = re.search(r'<span class="who">([^<]+)</span>', client.get("/").get_data(as_text=True))
    return found.group(1) if found else "anonymous"


def session_cookie(app, client) -> str:
    return client.get_cookie(app.config["SESSION_COOKIE_NAME"]).value


def browser_with(app, cookie: str):
    """A new browser holding a saved session cookie."""
    other = app.test_client()
    other.set_cookie(app.config["SESSION_COOKIE_NAME"], cookie)
    return other


def owners(app) -> dict[int, tuple]:
    with app.app_context():
        rows = db.session.scalars(select(HistoryEntry))
        return {row.id: (row.owner_user_id, row.owner_session) for row in rows}


# Item 1: a deleted account's cookie must not become the next account.


def test_a_deleted_accounts_id_is_never_given_to_the_next_account(app, runner):
    make_user(runner, "amy")
    make_user(runner, "eve")
    with app.app_context():
        eve_id = accounts.find_user("eve").id
    assert runner.invoke(args=["users", "delete", "eve"]).exit_code == 0
    make_user(runner, "frank", "operator")
    with app.app_context():
        assert accounts.find_user("frank").id > eve_id


def test_a_deleted_accounts_cookie_does_not_become_the_next_account(app, runner):
    make_user(runner, "eve")
    eve = app.test_client()
    login(eve, "eve")
    predict_id(eve, 1)
    someone_elses = predict_id(app.test_client(), 2)
    assert who(eve) == "eve"
    assert runner.invoke(args=["users", "delete", "eve"]).exit_code == 0
    make_user(runner, "frank", "operator")
    assert who(eve) == "anonymous"
    assert f'id="p{someone_elses}"' not in eve.get("/history").get_data(as_text=True)


def test_a_session_naming_an_account_by_its_id_is_no_one(app, runner):
    """The cookie holds the account's random session token: a cookie with its id (forged, or from
    before the tokens) names no one."""
    make_user(runner, "olga", "operator")
    client = app.test_client()
    login(client, "olga")
    with app.app_context():
        olga = accounts.find_user("olga")
        user_id, token = olga.id, olga.session_token
    with client.session_transaction() as session:
        assert session["_user_id"] == token
        session["_user_id"] = str(user_id)
    assert who(client) == "anonymous"


# Item 2: sessions can be revoked.


def test_logging_out_ends_every_session_of_the_account(app, runner):
    make_user(runner, "max")
    laptop, phone = app.test_client(), app.test_client()
    login(laptop, "max")
    login(phone, "max")
    saved = session_cookie(app, laptop)
    assert who(browser_with(app, saved)) == "max"
    page = laptop.get("/").get_data(as_text=True)
    assert "Log out everywhere" in page
    assert "every device" in laptop.post("/logout", follow_redirects=True).get_data(as_text=True)
    assert who(browser_with(app, saved)) == "anonymous"
    assert who(phone) == "anonymous"
    login(laptop, "max")
    assert who(laptop) == "max"


@pytest.mark.parametrize(
    ("command", "stdin"),
    [
        (["users", "set-password", "max", "--password-stdin"], "another password\n"),
        (["users", "set-role", "max", "operator"], None),
        (["users", "disable", "max"], None),
    ],
)
def test_password_role_changes_and_disabling_end_the_sessions(app, runner, command, stdin):
    make_user(runner, "max")
    client = app.test_client()
    login(client, "max")
    saved = session_cookie(app, client)
    result = runner.invoke(args=command, input=stdin)
    assert result.exit_code == 0, result.output
    assert who(client) == "anonymous" and who(browser_with(app, saved)) == "anonymous"


def test_a_disabled_account_cannot_log_in_nor_use_its_keys_until_enabled(app, runner):
    make_user(runner, "max")
    key = make_key(runner, "max")
    assert runner.invoke(args=["users", "disable", "max"]).exit_code == 0
    client = app.test_client()
    assert login(client, "max").status_code == 401
    assert classify(client, random_image_bytes(), headers=bearer(key)).status_code == 401
    assert runner.invoke(args=["users", "disable", "nobody"]).exit_code == 1
    assert runner.invoke(args=["users", "enable", "max"]).exit_code == 0
    assert login(client, "max").status_code == 302 and who(client) == "max"
    assert classify(client, random_image_bytes(), headers=bearer(key)).status_code == 200


def test_a_login_lasts_at_most_the_session_lifetime(app, runner, monkeypatch):
    assert app.permanent_session_lifetime == timedelta(days=14)
    make_user(runner, "max")
    signed_at = TimestampSigner.get_timestamp(None)
    # Each browser is asked once: a page that changes the session (its CSRF token) signs it anew.
    for days_later, expected in ((13, "max"), (15, "anonymous")):
        client = app.test_client()
        login(client, "max")
        later = signed_at + days_later * 86400
        with monkeypatch.context() as patch:
            patch.setattr(TimestampSigner, "get_timestamp", lambda self, later=later: later)
            assert who(client) == expected


# Item 16 (part): lockout and password hashes.


def test_repeated_failed_logins_lock_the_account_for_a_while(app, runner):
    app.config["LOGIN_LOCKOUT_FAILURES"] = 3
    make_user(runner, "max")
    make_user(runner, "mia")
    client = app.test_client()
    for _ in range(3):
        assert login(client, "max", "wrong guess").status_code == 401
    locked = login(client, "max")
    assert locked.status_code == 429 and "Too many failed log-ins" in locked.get_data(as_text=True)
    assert login(app.test_client(), "mia").status_code == 302  # another account is not held
    with app.app_context():
        accounts.find_user("max").locked_until = datetime.now(UTC) - timedelta(seconds=1)
        db.session.commit()
    assert login(client, "max").status_code == 302
    with app.app_context():
        assert accounts.find_user("max").failed_logins == 0


def test_older_password_hashes_still_verify_and_are_redone_at_login(app, runner):
    make_user(runner, "max")
    with app.app_context():
        assert accounts.find_user("max").password_hash.startswith(accounts.password_method() + "$")
        old = generate_password_hash("correct horse", method="pbkdf2:sha256:1000")
        accounts.find_user("max").password_hash = old
        db.session.commit()
    assert login(app.test_client(), "max").status_code == 302
    with app.app_context():
        assert accounts.find_user("max").password_hash.startswith(accounts.password_method() + "$")
        assert accounts.authenticate("max", "correct horse")


def test_passwords_are_hashed_with_the_configured_method_and_never_a_cheaper_one_outside_tests(
    make_app, make_served_app
):
    strong = make_served_app(PASSWORD_HASH_METHOD="scrypt:65536:8:1")
    make_user(strong.test_cli_runner(), "max")
    with strong.app_context():
        assert accounts.find_user("max").password_hash.startswith("scrypt:65536:8:1$")
    for cheaper in ("scrypt:1024:8:1", "scrypt:32768:1:8", "pbkdf2:sha256:600000"):
        with pytest.raises(RuntimeError, match="is cheaper to guess than"):
            make_app("other", TESTING=False, PASSWORD_HASH_METHOD=cheaper)
    for unknown in ("rot13", "scrypt:abc"):
        with pytest.raises(RuntimeError, match=r"not a werkzeug\.security method"):
            make_app("other", PASSWORD_HASH_METHOD=unknown)


def test_a_method_spelled_short_is_recognised_in_stored_hashes(make_served_app):
    app = make_served_app(PASSWORD_HASH_METHOD="scrypt")  # werkzeug writes scrypt:32768:8:1
    make_user(app.test_cli_runner(), "max")
    with app.app_context():
        stored = accounts.find_user("max").password_hash
    assert stored.startswith("scrypt:32768:8:1$")
    assert login(app.test_client(), "max").status_code == 302
    with app.app_context():
        assert accounts.find_user("max").password_hash == stored  # current: not hashed again


# Item 9: API keys authenticate the API and /metrics only.


def test_api_keys_work_on_the_api_and_metrics_but_not_on_the_pages(app, runner):
    make_user(runner, "olga", "operator")
    key = make_key(runner, "olga")
    client = app.test_client()
    owned = predict_id(client, 1, headers=bearer(key))
    with app.app_context():
        assert prediction_history.get(owned).owner_user_id == accounts.find_user("olga").id
    # On a page the key authenticates no one, and a header that does not authenticate is refused.
    assert client.get("/history", headers=bearer(key)).status_code == 401
    assert client.post(f"/predictions/{owned}/delete", headers=bearer(key)).status_code == 401
    assert client.post("/history/forget", headers=bearer(key)).status_code == 401
    assert owned in owners(app)
    remote = {"REMOTE_ADDR": "203.0.113.9"}
    assert client.get("/metrics", environ_base=remote, headers=bearer(key)).status_code == 200


def test_api_key_state_tells_a_refused_key_from_an_ignored_one(app, runner):
    make_user(runner, "max")
    key = make_key(runner, "max")
    cases = [
        ("/api/v1/models", bearer(key), "live"),
        ("/api/v1/models", bearer("ick_made_up"), "refused"),
        ("/metrics", bearer("ick_made_up"), "refused"),
        ("/history", bearer(key), "ignored"),
        ("/api/v1/models", {}, None),
    ]
    for path, headers, state in cases:
        with app.test_request_context(path, headers=headers):
            assert api_key_state() == state, path


# Item 6: an anonymous visitor keeps control of its photos.


def test_the_anonymous_owner_cookie_lasts_as_long_as_the_predictions(make_app, app):
    response = classify(app.test_client(), random_image_bytes(), route="/")
    cookie = next(c for c in response.headers.getlist("Set-Cookie") if c.startswith(ANONYMOUS_COOKIE + "="))
    assert f"Max-Age={30 * 86400}" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    forever = make_app(instance="forever", RETENTION_DAYS=0)
    serve_registry(forever)
    response = classify(forever.test_client(), random_image_bytes(), route="/")
    assert f"Max-Age={400 * 86400}" in response.headers["Set-Cookie"]


def test_the_anonymous_owner_outlives_the_session_cookie(app):
    visitor = app.test_client()
    prediction_id = predict_id(visitor, 1, route="/")
    # The browser ends its session (session cookies go), the owner cookie stays.
    visitor.delete_cookie(app.config["SESSION_COOKIE_NAME"])
    assert visitor.post(f"/predictions/{prediction_id}/delete").status_code == 302
    assert prediction_id not in owners(app)


def test_at_login_the_visitors_predictions_move_to_the_account(app, runner):
    make_user(runner, "max")
    visitor = app.test_client()
    ids = [predict_id(visitor, seed, route="/") for seed in (1, 2)]
    form = visitor.get("/login").get_data(as_text=True)
    assert "Your 2 predictions made without logging in" in form and 'value="delete"' in form
    page = login(visitor, "max")
    assert page.status_code == 302 and f"{ANONYMOUS_COOKIE}=;" in page.headers["Set-Cookie"]
    shown = visitor.get("/").get_data(as_text=True)
    assert "The 2 predictions you made before logging in are now in your account" in shown
    with app.app_context():
        max_id = accounts.find_user("max").id
    assert {owners(app)[i] for i in ids} == {(max_id, None)}
    visitor.post("/logout")
    assert all(f'id="p{i}"' not in visitor.get("/history").get_data(as_text=True) for i in ids)


def test_at_login_the_visitor_may_delete_its_predictions_instead(app, runner):
    make_user(runner, "max")
    visitor, other = app.test_client(), app.test_client()
    mine, kept = predict_id(visitor, 1, route="/"), predict_id(other, 2, route="/")
    page = visitor.post(
        "/login",
        data={"username": "max", "password": "correct horse", "anonymous_predictions": "delete"},
        follow_redirects=True,
    )
    assert "The 1 predictions you made before logging in are deleted" in page.get_data(as_text=True)
    assert mine not in owners(app) and kept in owners(app)


# Item 7: RETENTION_DAYS=0 keeps predictions until deleted.


def test_retention_days_zero_purges_nothing_and_all_needs_confirming(make_served_app):
    app = make_served_app(RETENTION_DAYS=0)
    prediction_id = predict_id(app.test_client(), 1)
    with app.app_context():
        prediction_history.get(prediction_id).created_at = datetime.now(UTC) - timedelta(days=400)
        db.session.commit()
    runner = app.test_cli_runner()
    kept = runner.invoke(args=["purge-history"])
    assert kept.exit_code == 0 and "kept until deleted, none purged" in kept.output
    assert runner.invoke(args=["purge-history", "--days", "0"]).exit_code == 2
    refused = runner.invoke(args=["purge-history", "--all"], input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert prediction_id in owners(app)
    wiped = runner.invoke(args=["purge-history", "--all"], input="y\n")
    assert wiped.exit_code == 0 and "deleted all 1 predictions" in wiped.output
    assert owners(app) == {}


# Item 13: control characters are refused before any query.


@pytest.mark.parametrize(
    ("method", "path", "data"),
    [
        ("get", "/history?class=%00", None),
        ("get", "/history?class=cat%01", None),
        ("post", "/login", {"username": "max\x00", "password": "correct horse"}),
        ("post", "/predictions/1/feedback", {"verdict": "wrong", "correct_class": "c\x00t"}),
        ("get", "/api/v1/models?x%00=1", None),
    ],
)
def test_control_characters_are_refused_with_400(app, runner, method, path, data):
    make_user(runner, "max")
    response = getattr(app.test_client(), method)(path, data=data)
    assert response.status_code == 400, response.get_data(as_text=True)
    assert "control character" in response.get_data(as_text=True)


# Item 15: personal pages are stored by no cache.


def test_personal_pages_are_not_stored_by_caches(app, client):
    result = classify(client, random_image_bytes(), route="/")
    prediction_id = int(re.search(r"/predictions/(\d+)/feedback", result.get_data(as_text=True)).group(1))
    answers = {
        "result": result,
        "api": classify(client, random_image_bytes(1)),
        "history": client.get("/history"),
        "explain": client.get(f"/predictions/{prediction_id}/explain"),
        "thumbnail": client.get(f"/predictions/{prediction_id}/thumbnail.jpg"),
    }
    assert {name: (r.status_code, r.headers.get("Cache-Control")) for name, r in answers.items()} == {
        name: (200, "private, no-store") for name in answers
    }


# Item 12: public metrics are an allow-list, nested keys included.


def test_only_allow_listed_metrics_are_public_nested_ones_too(app, runner, seed_model_file, tmp_path):
    metrics = {
        "arch": "cnn",
        "test_accuracy": 0.5,
        "new_private_thing": "/home/builder/x",
        "data_source": "/home/builder/data",
        "ood_evaluation": {"command": "python benchmarks/calibration_ood.py --data /home/builder/data", "groups": []},
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    imported = runner.invoke(args=["models", "import", str(seed_model_file), "--metrics", str(path)])
    assert imported.exit_code == 0, imported.output
    model_id = int(re.search(r"as model (\d+)", imported.output).group(1))
    client = app.test_client()

    def api_metrics(**kwargs):
        listed = client.get("/api/v1/models", **kwargs).get_json()["models"]
        return next(model["metrics"] for model in listed if model["id"] == model_id)

    public = api_metrics()
    assert public.pop("imported_from")["filename"] == "modelo.h5"
    assert public == {"arch": "cnn", "test_accuracy": 0.5, "ood_evaluation": {"groups": []}}
    assert "/home/builder" not in client.get(f"/models/{model_id}").get_data(as_text=True)
    make_user(runner, "olga", "operator")
    assert api_metrics(headers=bearer(make_key(runner, "olga"))).items() >= metrics.items()
    login(client, "olga")
    assert "/home/builder/data" in client.get(f"/models/{model_id}").get_data(as_text=True)


# The migration: SQLite rebuilds `users` for AUTOINCREMENT without cascading into its children.


def test_the_session_token_migration_keeps_accounts_keys_and_predictions(bare_app):
    with bare_app.app_context():
        upgrade(revision="0005")
        now = datetime.now(UTC)
        db.session.execute(
            text("INSERT INTO users (name, password_hash, role, created_at) VALUES ('max', 'h', 'member', :t)"),
            {"t": now},
        )
        db.session.execute(
            text(
                "INSERT INTO api_keys (name, user_id, prefix, key_sha256, created_at) VALUES ('k', 1, 'ick_', 'ab', :t)"
            ),
            {"t": now},
        )
        db.session.execute(
            text(
                "INSERT INTO predictions (created_at, model_name, model_version, source, filename, top_class,"
                " confidence, image_sha256, owner_user_id) VALUES (:t, 'm', 1, 'web', 'a.png', 'cat', 0.5, 'ab', 1)"
            ),
            {"t": now},
        )
        db.session.commit()
        model_store.init_db()
        assert db.session.execute(text("SELECT count(*) FROM api_keys")).scalar() == 1
        assert db.session.execute(text("SELECT owner_user_id FROM predictions")).scalar() == 1
        user = accounts.find_user("max")
        assert len(user.session_token) >= 40 and user.failed_logins == 0 and user.is_active
        db.session.delete(user)
        db.session.commit()
        assert accounts.create_user("eve", "correct horse").id == 2
