"""Several app instances on one PostgreSQL server: what one activates, the other serves; a
canary started and rolled back from one instance's CLI is followed by both.

Runs where TEST_DATABASE_URL points at PostgreSQL (CI starts one with .ci/start-postgres);
elsewhere it is skipped with that reason shown.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import POSTGRES_URL, gunicorn_user_env, image_bytes

import model_store

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,  # two gunicorn servers
    pytest.mark.postgresql_only,  # skipped where TEST_DATABASE_URL names no PostgreSQL server
]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, data: bytes | None = None, content_type: str | None = None):
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type} if content_type else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def flask(env: dict, tmp_path: Path, *args: str) -> None:
    """Run a `flask` command as the operator does, through instance one's configuration."""
    cli = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=ROOT,
        env={**env, "INSTANCE_PATH": str(tmp_path / "one")},
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr


def challenger_at(port: int) -> int | None:
    """The id of the model an instance holds in its challenger slot (None: none)."""
    slot = get_json(f"http://127.0.0.1:{port}/healthz")[1]["slots"].get("challenger") or {}
    return (slot.get("model") or {}).get("id")


def test_two_instances_share_one_registry(app, tmp_path, other_model_file):
    env = {**os.environ, "DATABASE_URL": POSTGRES_URL, "FLASK_MODEL_POLL_SECONDS": "0.5", **gunicorn_user_env()}
    servers, ports = [], []
    try:
        for name in ("one", "two"):
            port = free_port()
            instance_env = {**env, "INSTANCE_PATH": str(tmp_path / name), "PORT": str(port), "WEB_WORKERS": "1"}
            servers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
                    cwd=ROOT,
                    env=instance_env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            ports.append(port)
        for port in ports:
            status, body = wait_for(lambda p=port: get_json(f"http://127.0.0.1:{p}/healthz"))
            assert status == 200 and body["model"]["name"] == "seed"
        # A model is imported (here, not in a child that would load TensorFlow again), and the
        # operator activates it through instance one's CLI...
        with app.app_context():
            shared = model_store.import_model(other_model_file, name="shared").id
        flask(env, tmp_path, "models", "activate", str(shared))
        # ...and instance two serves it, without a restart.
        for port in reversed(ports):
            wait_for(lambda p=port: get_json(f"http://127.0.0.1:{p}/healthz")[1]["model"]["name"] == "shared")
            status, body = get_json(f"http://127.0.0.1:{port}/api/v1/predict", image_bytes(), "image/jpeg")
            assert status == 200 and body["model"]["name"] == "shared"
        # A canary of the seed, then its rollback: both instances load and drop the challenger.
        flask(env, tmp_path, "models", "canary", "1", "--share", "50")
        for port in ports:
            wait_for(lambda p=port: challenger_at(p) == 1)
        flask(env, tmp_path, "models", "rollback", "--reason", "test")
        for port in ports:
            wait_for(lambda p=port: challenger_at(p) is None)
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)


def test_models_are_stored_as_bytea(app):
    from sqlalchemy import text

    from model_store import db

    with app.app_context():
        kind = db.session.execute(
            text(
                "SELECT data_type FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND table_name = 'model_versions' AND column_name = 'blob'"
            )
        ).scalar()
    assert kind == "bytea"
