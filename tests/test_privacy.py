"""Privacy defaults: thumbnails without metadata and not cached, private files, uploads in memory,
trusted hosts against DNS rebinding, the referrer policy with HTTPS forms, cookies, the secret key."""

import io
import re
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import classify, image_bytes, serve_registry
from PIL import Image
from sqlalchemy import text

import app as app_module
import model_store
import prediction_history
from database import db
from prediction_history import HistoryEntry


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_thumbnails_keep_no_metadata_and_are_not_cached(app, client):
    exif = Image.Exif()
    exif[0x010F] = "Camera of Jane Doe"  # Make
    exif[0x013B] = "Jane Doe"  # Artist
    upload = image_bytes(size=(64, 64), comment=b"owner: Jane Doe", exif=exif.tobytes())
    assert b"Jane Doe" in upload
    prediction_id = classify(client, upload).get_json()["predictions"][0]["id"]
    with app.app_context():
        stored = prediction_history.get(prediction_id).thumbnail
    assert stored.startswith(b"\xff\xd8") and b"Jane Doe" not in stored
    thumbnail = Image.open(io.BytesIO(stored))
    assert "comment" not in thumbnail.info and "exif" not in thumbnail.info
    response = client.get(f"/predictions/{prediction_id}/thumbnail.jpg")
    assert response.status_code == 200 and response.data == stored
    assert response.headers["Cache-Control"] == "private, no-store"


@pytest.mark.backend_independent("SQLite's own files and locks: the test names its SQLite database")
def test_instance_folder_database_and_secret_key_are_private(make_app, seed_model_file, tmp_path):
    app = make_app(
        instance="private", SECRET_KEY=None, SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'private' / 'app.sqlite'}"
    )
    instance = Path(app.instance_path)
    runner = app.test_cli_runner()
    assert runner.invoke(args=["init-db"]).exit_code == 0
    assert runner.invoke(args=["models", "import", str(seed_model_file), "--activate"]).exit_code == 0
    serve_registry(app)
    client = app.test_client()
    assert classify(client, image_bytes()).status_code == 200
    assert _mode(instance) == 0o700
    assert _mode(instance / "secret_key") == 0o600
    files = [instance / name for name in ("app.sqlite", "app.sqlite-wal", "app.sqlite-shm")]
    assert all(path.exists() for path in files)
    assert {path.name: _mode(path) for path in files} == {path.name: 0o600 for path in files}


@pytest.mark.backend_independent("SQLite's own files and locks: the test names its SQLite database")
def test_an_existing_world_readable_instance_is_made_private(make_app, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir(mode=0o755)
    database = folder / "app.sqlite"
    database.touch(mode=0o644)
    make_app(instance="old", SQLALCHEMY_DATABASE_URI=f"sqlite:///{database}")
    assert (_mode(folder), _mode(database)) == (0o700, 0o600)


@pytest.mark.backend_independent("SQLite's own files and locks: the test names its SQLite database")
def test_a_second_app_in_one_process_keeps_the_first_ones_sqlite_locks(make_app, tmp_path):
    """Closing a descriptor of the database file drops the process's POSIX locks, SQLite's too:
    another process closing its connection would then think itself the last one and delete the
    WAL that this process's open connection still uses (a benchmark's database got corrupt so)."""
    database = tmp_path / "shared.sqlite"
    first = make_app(instance="first", SQLALCHEMY_DATABASE_URI=f"sqlite:///{database}")
    with first.app_context():
        db.session.execute(text("CREATE TABLE t (x)"))
        db.session.commit()
        assert db.session.execute(text("SELECT count(*) FROM t")).scalar() == 0  # a connection stays open
        make_app(instance="second", SQLALCHEMY_DATABASE_URI=f"sqlite:///{database}")
        other = f"import sqlite3; c = sqlite3.connect({str(database)!r}); c.execute('SELECT 1 FROM t'); c.close()"
        subprocess.run([sys.executable, "-c", other], check=True)
        assert Path(f"{database}-wal").exists()  # still this process's, not checkpointed away


@pytest.mark.backend_independent("request handling; recording is test_predictions'")
def test_large_uploads_stay_in_memory(app, client, monkeypatch):
    spilled = []
    real_temporary_file = tempfile.TemporaryFile

    def watched(*args, **kwargs):
        spilled.append(args)
        return real_temporary_file(*args, **kwargs)

    # Werkzeug's default spools a multipart file of over 500 KB to tempfile.TemporaryFile.
    monkeypatch.setattr(tempfile, "TemporaryFile", watched)
    pixels = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    assert len(buffer.getvalue()) > 1_000_000
    # The body is encoded here: the test client would itself spool a large form to a temporary file.
    body = (
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + buffer.getvalue() + b"\r\n--b--\r\n"
    )
    response = client.post("/api/v1/predict", data=body, content_type="multipart/form-data; boundary=b")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert spilled == []


def test_hosts_outside_trusted_hosts_are_refused_against_dns_rebinding(make_app, app, client):
    rebound = {"Host": "rebind.attacker.example:5000", "Origin": "http://rebind.attacker.example:5000"}
    assert client.get("/history", headers=rebound).status_code == 400
    assert classify(client, image_bytes(), headers=rebound).status_code == 400
    # The Host is ours, the Origin is not: the API's cross-site check compares with the trusted list.
    response = classify(client, image_bytes(), headers={"Origin": "http://rebind.attacker.example:5000"})
    assert response.status_code == 403 and response.get_json()["error"]["code"] == "cross_site"
    # A trusted host on another port is another origin; the test client's own one passes.
    assert classify(client, image_bytes(), headers={"Origin": "http://127.0.0.1:5000"}).status_code == 403
    assert classify(client, image_bytes(), headers={"Origin": "http://localhost"}).status_code == 200
    with app.app_context():
        assert db.session.query(HistoryEntry).count() == 1
    # A second app on the same database, so it serves the same model: ready, 200, for its hosts.
    configured_app = make_app(TRUSTED_HOSTS=["photos.example.org"])
    serve_registry(configured_app)
    configured = configured_app.test_client()
    assert configured.get("/healthz", headers={"Host": "photos.example.org"}).status_code == 200
    assert configured.get("/healthz", headers={"Host": "localhost:8000"}).status_code == 200
    assert configured.get("/healthz", headers={"Host": "evil.example.org"}).status_code == 400


@pytest.mark.backend_independent("request handling; recording is test_predictions'")
def test_forms_post_over_https_with_csrf_and_the_referrer_policy(make_app, seed_model_file):
    app = make_app(WTF_CSRF_ENABLED=True)
    with app.app_context():
        model_store.init_db()
        model_store.import_model(seed_model_file, activate=True)
    serve_registry(app)
    client = app.test_client()
    page = client.get("/", base_url="https://localhost")
    assert page.headers["Referrer-Policy"] == "same-origin"
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    # What a browser sends under Referrer-Policy: same-origin (none at all under no-referrer).
    response = client.post(
        "/",
        base_url="https://localhost",
        data={"image": [(io.BytesIO(image_bytes()), "a.jpg")], "csrf_token": token},
        headers={"Referer": "https://localhost/"},
        content_type="multipart/form-data",
    )
    assert response.status_code == 200, response.get_data(as_text=True)
    assert "top-class" in response.get_data(as_text=True)


@pytest.mark.backend_independent("request handling; recording is test_predictions'")
def test_session_cookie_is_httponly_lax_and_secure_over_https(app):
    http_cookie = classify(app.test_client(), image_bytes()).headers["Set-Cookie"]
    assert "HttpOnly" in http_cookie and "SameSite=Lax" in http_cookie and "Secure" not in http_cookie
    https_cookie = classify(app.test_client(), image_bytes(), base_url="https://localhost").headers["Set-Cookie"]
    assert "HttpOnly" in https_cookie and "SameSite=Lax" in https_cookie and "Secure" in https_cookie


def test_secret_key_of_workers_starting_at_once_is_never_empty(tmp_path):
    instance = tmp_path / "race"
    instance.mkdir()
    keys, barrier = [], threading.Barrier(8)

    def start():
        barrier.wait()
        keys.append(app_module._secret_key(instance))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert [path.name for path in instance.iterdir()] == ["secret_key"]  # no temporary file left
