"""Request limits: failed logins per address, predictions per key and per address, 429 with
Retry-After (JSON for the API), and one limit shared by two servers through Redis."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers import bearer, classify, gunicorn_user_env, image_bytes, login, make_key, make_user
from sqlalchemy import func, select

from database import db
from prediction_history import HistoryEntry

ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server")
pytestmark = pytest.mark.backend_independent(
    "the limiter counts in memory or in Redis, never in the database; a refused request records nothing"
)


@pytest.fixture
def limited_app(make_served_app):
    return make_served_app(RATELIMIT_ENABLED=True, PREDICT_RATE_LIMIT="2 per minute", LOGIN_RATE_LIMIT="3 per minute")


def test_failed_logins_are_limited_per_address(limited_app):
    runner = limited_app.test_cli_runner()
    make_user(runner, "max")
    client = limited_app.test_client()
    assert login(client, "max").status_code == 302  # a successful login does not count
    for _ in range(3):
        assert login(client, "max", "wrong password").status_code == 401
    held = login(client, "max")
    assert held.status_code == 429 and int(held.headers["Retry-After"]) <= 60
    assert "Too many requests" in held.get_data(as_text=True)
    other_address = limited_app.test_client()
    response = other_address.post(
        "/login", data={"username": "max", "password": "correct horse"}, environ_base={"REMOTE_ADDR": "10.0.0.2"}
    )
    assert response.status_code == 302


def test_predictions_are_limited_per_key_and_per_address(limited_app):
    runner = limited_app.test_cli_runner()
    make_user(runner, "max")
    first, second = make_key(runner, "max", "a"), make_key(runner, "max", "b")
    client = limited_app.test_client()
    for _ in range(2):
        assert classify(client, image_bytes(), headers=bearer(first)).status_code == 200
    over = classify(client, image_bytes(), headers=bearer(first))
    assert over.status_code == 429 and over.is_json and over.get_json()["error"]["code"] == "rate_limited"
    assert 0 <= int(over.headers["Retry-After"]) <= 60
    assert classify(client, image_bytes(), headers=bearer(second)).status_code == 200
    anonymous = {"REMOTE_ADDR": "192.0.2.1"}
    assert classify(client, image_bytes(), route="/", environ_base=anonymous).status_code == 200  # with a map: 2
    page = classify(client, image_bytes(), route="/", environ_base=anonymous)
    assert page.status_code == 429 and "Too many requests" in page.get_data(as_text=True)
    assert classify(client, image_bytes(), environ_base=anonymous).status_code == 429  # one budget
    assert classify(client, image_bytes(), environ_base={"REMOTE_ADDR": "192.0.2.2"}).status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    """Return once `url` answers; fail at once if the server exits (not after `seconds`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer (server exit status {server.poll()})")


def _predict(url: str, key: str) -> int:
    boundary = "limits-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url + "/api/v1/predict",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture
def redis_url():
    if REDIS_SERVER is None:
        pytest.skip("no redis-server (apt-get install redis-server; CI installs it)")
    port = _free_port()
    server = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}"
    server.terminate()
    server.wait(30)


@pytest.mark.slow
def test_one_limit_holds_across_two_servers_through_redis(app, redis_url, tmp_path):
    """Two gunicorn servers (one worker each, so each is its own process) share the counters."""
    runner = app.test_cli_runner()
    make_user(runner, "max")
    key = make_key(runner, "max")
    urls, servers = [], []
    for index in range(2):
        port = _free_port()
        env = {
            **os.environ,
            "INSTANCE_PATH": app.instance_path,
            "DATABASE_URL": app.config["SQLALCHEMY_DATABASE_URI"],
            "PORT": str(port),
            "WEB_WORKERS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / f"prometheus-{index}"),
            "FLASK_RATELIMIT_STORAGE_URI": redis_url,
            "FLASK_PREDICT_RATE_LIMIT": "3 per minute",
            **gunicorn_user_env(),
        }
        servers.append(
            subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"], cwd=ROOT, env=env)
        )
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, server in zip(urls, servers, strict=True):
            _wait_for(url + "/healthz", server)
        assert [_predict(urls[0], key), _predict(urls[1], key), _predict(urls[0], key)] == [200, 200, 200]
        assert _predict(urls[1], key) == 429
        assert _predict(urls[0], key) == 429
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(30)


def test_a_logged_in_user_cannot_escape_the_limit_with_made_up_keys(limited_app):
    runner = limited_app.test_cli_runner()
    make_user(runner, "max")
    make_user(runner, "ann")
    anns_key = make_key(runner, "ann")
    client = limited_app.test_client()
    assert login(client, "max").status_code == 302
    for _ in range(2):
        assert classify(client, image_bytes()).status_code == 200
    assert classify(client, image_bytes()).status_code == 429
    # Each made-up key used to open a bucket of its own: now a header that authenticates nothing
    # is refused, with the session cookie, on the API, the page and every other route.
    for made_up in ("made-up-1", "made-up-2"):
        refused = classify(client, image_bytes(), headers=bearer(made_up))
        assert refused.status_code == 401 and refused.get_json()["error"]["code"] == "unauthorized"
    assert classify(client, image_bytes(), route="/", headers=bearer("made-up-3")).status_code == 401
    assert client.get("/history", headers={"Authorization": "Basic bWF4Om5vcGU="}).status_code == 401
    assert classify(client, image_bytes(), headers=bearer(anns_key)).status_code == 401  # not max's key
    assert client.get("/history").status_code == 200  # the session alone still works


def test_a_key_counts_against_its_own_bucket_only_when_it_authenticated(limited_app):
    runner = limited_app.test_cli_runner()
    make_user(runner, "max")
    key = make_key(runner, "max")
    client = limited_app.test_client()
    assert login(client, "max").status_code == 302
    for _ in range(2):
        assert classify(client, image_bytes()).status_code == 200  # the session's bucket
    assert classify(client, image_bytes(), headers=bearer(key)).status_code == 200  # the key's own


@pytest.fixture
def costed_app(make_served_app):
    return make_served_app(RATELIMIT_ENABLED=True, PREDICT_RATE_LIMIT="4 per minute", EXPLAIN_COST=2)  # pages: 2 too


def test_predictions_are_counted_in_images_and_a_saliency_map_costs_more(costed_app):
    client = costed_app.test_client()
    assert classify(client, *[image_bytes()] * 4).status_code == 200  # four images: the whole budget
    over = classify(client, image_bytes())
    assert over.status_code == 429 and over.get_json()["error"]["code"] == "rate_limited"
    other = {"REMOTE_ADDR": "192.0.2.7"}
    explained = classify(client, image_bytes(), image_bytes(), route="/api/v1/predict?explain=1", environ_base=other)
    assert explained.status_code == 200
    assert classify(client, image_bytes(), environ_base=other).status_code == 429  # 2 images x 2
    page = {"REMOTE_ADDR": "192.0.2.8"}  # the page always draws maps
    assert classify(client, image_bytes(), image_bytes(), route="/", environ_base=page).status_code == 200
    assert classify(client, image_bytes(), route="/", environ_base=page).status_code == 429


def test_the_explain_page_is_limited_with_the_predictions(costed_app):
    client = costed_app.test_client()
    assert classify(client, image_bytes(), route="/").status_code == 200  # costs 2 of 4
    with costed_app.app_context():
        prediction_id = db.session.scalar(select(func.max(HistoryEntry.id)))
    assert client.get(f"/predictions/{prediction_id}/explain").status_code == 200  # 4 of 4
    over = client.get(f"/predictions/{prediction_id}/explain")
    assert over.status_code == 429 and "Too many requests" in over.get_data(as_text=True)


def test_explain_is_for_a_few_images_per_request(make_served_app):
    client = make_served_app(MAX_EXPLAINED_IMAGES=2).test_client()
    refused = classify(client, *[image_bytes()] * 3, route="/api/v1/predict?explain=1")
    assert refused.status_code == 413 and "at most 2 images" in refused.get_json()["error"]["message"]
    answer = classify(client, *[image_bytes()] * 2, route="/api/v1/predict?explain=1")
    assert answer.status_code == 200 and all(p["saliency"] for p in answer.get_json()["predictions"])
    assert classify(client, *[image_bytes()] * 3).status_code == 200  # without maps, as many as allowed
