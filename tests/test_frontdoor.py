"""The front door, for real: nginx (Debian's package, installed by .ci/run) in front of gunicorn on
a unix socket, both started on free local ports with this test's own small limits; and what
`make serve-proxy` checks before it starts them."""

import grp
import http.client
import json
import os
import pwd
import runpy
import shutil
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import image_bytes, nobody_can_run_python

import model_store
from deploy import frontdoor
from deploy.frontdoor import PLACEHOLDER, ROOT, FrontDoorSettings, nginx_size, render, serve, wait_ready

HEADER_TIMEOUT = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(port, method, path, body=b"", headers=None, source="127.0.0.1"):
    """A request from `source` through a TLS terminator (simulated: its X-Forwarded-* headers)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    terminator = {"X-Forwarded-For": source, "X-Forwarded-Proto": "https"}
    try:
        connection.request(method, path, body=body, headers={**terminator, **(headers or {})})
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


def predict(port, source="127.0.0.1"):
    return call(port, "POST", "/api/v1/predict", image_bytes(), {"Content-Type": "image/jpeg"}, source)[0]


def test_rendered_config_fills_every_placeholder_and_matches_the_body_limit(tmp_path):
    text = render(FrontDoorSettings(socket=str(tmp_path / "g.sock"), max_body=nginx_size(16 * 1024 * 1024)), tmp_path)
    assert not PLACEHOLDER.search(text)
    assert "client_max_body_size 16m;" in text and f"unix:{tmp_path / 'g.sock'}" in text
    assert nginx_size(1000) == "1000"


class Started(Exception):
    """Raised by the stand-in for serve(): the front door would have started."""


def test_serve_proxy_refuses_a_public_address_with_anonymous_use_left_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    monkeypatch.setenv("FLASK_SQLALCHEMY_DATABASE_URI", f"sqlite:///{tmp_path / 'app.sqlite'}")
    monkeypatch.setenv("HOST", "0.0.0.0")  # the README's own `HOST=0.0.0.0 make serve-proxy`
    monkeypatch.setenv("PORT", "8081")
    monkeypatch.setattr(frontdoor, "serve", lambda *args: (_ for _ in ()).throw(Started()))
    monkeypatch.setattr(frontdoor.signal, "signal", lambda *args: None)
    assert frontdoor.main() == 1
    assert "refusing to serve on 0.0.0.0:8081" in capsys.readouterr().err
    # Anonymous use set on or off on purpose: it starts.
    monkeypatch.setenv("FLASK_ALLOW_ANONYMOUS", "false")
    monkeypatch.setenv("FLASK_ALLOW_ANONYMOUS_API", "false")
    with pytest.raises(Started):
        frontdoor.main()


@pytest.mark.skipif(os.geteuid() != 0, reason="the workers drop from root: this test must run as root")
def test_started_as_root_the_workers_of_both_servers_run_as_nobody(tmp_path, monkeypatch):
    nobody = pwd.getpwnam("nobody")
    monkeypatch.delenv("WEB_USER", raising=False)
    monkeypatch.setattr(frontdoor, "unreachable_paths", lambda account: [])  # Python where nobody reads it
    # nginx's workers (the master keeps root to bind and read its config).
    rendered = render(FrontDoorSettings(socket=str(tmp_path / "g.sock")), tmp_path)
    assert rendered.splitlines()[3] == f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};"
    # gunicorn's workers, and the instance folder they write in, made by root here.
    monkeypatch.setenv("INSTANCE_PATH", str(tmp_path / "instance"))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "instance" / "prometheus"))
    monkeypatch.setenv("SERVER_BIND", "")  # on_starting sets it: restored after the test
    (tmp_path / "instance").mkdir(mode=0o700)
    (tmp_path / "instance" / "app.sqlite").write_bytes(b"")
    settings = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert (settings["user"], settings["group"]) == (nobody.pw_uid, nobody.pw_gid)
    settings["on_starting"](SimpleNamespace(cfg=SimpleNamespace(bind=["unix:g.sock"])))
    for path in (tmp_path / "instance", tmp_path / "instance" / "app.sqlite", tmp_path / "instance" / "prometheus"):
        assert path.stat().st_uid == nobody.pw_uid, path


@pytest.mark.skipif(os.geteuid() != 0, reason="the workers drop from root: this test must run as root")
def test_workers_stay_root_only_when_the_default_user_cannot_read_python(monkeypatch, capsys):
    monkeypatch.setattr(frontdoor, "unreachable_paths", lambda account: ["/root/python"])
    monkeypatch.delenv("WEB_USER", raising=False)
    assert frontdoor.service_account() is None
    assert "the workers stay root: nobody cannot read /root/python" in capsys.readouterr().err
    monkeypatch.setenv("WEB_USER", "nobody")  # asked for by name: refused, never root instead
    with pytest.raises(SystemExit, match="WEB_USER=nobody: nobody cannot read /root/python"):
        frontdoor.service_account()


def test_an_account_cannot_enter_a_folder_closed_to_others():
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp())  # in /tmp, which everyone may enter
    try:
        closed = top / "python"
        closed.mkdir()
        top.chmod(0o700)
        assert frontdoor.unreachable_paths_of(nobody, [closed]) == [str(closed)]
        top.chmod(0o701)
        assert frontdoor.unreachable_paths_of(nobody, [closed]) == []
    finally:
        shutil.rmtree(top)


def child_uids(parent: int) -> list[int]:
    """The real user ids of `parent`'s child processes (its workers)."""
    uids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:  # the process ended while we looked
            continue
        if int(fields["PPid"]) == parent:
            uids.append(int(fields["Uid"].split()[0]))
    return uids


@pytest.mark.slow
@pytest.mark.backend_independent("nginx's limits, buffers and headers; gunicorn on PostgreSQL is test_postgres's")
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)")
def test_nginx_in_front_of_gunicorn(make_app, seed_model_file, tmp_path, monkeypatch):
    # Started as root, the workers run as nobody: the instance folder and its database must be
    # where nobody can reach them, not in pytest's private folder.
    shared = Path(tempfile.mkdtemp(prefix="imgcls-frontdoor-"))
    shared.chmod(0o755)
    try:
        run_front_door(make_app, seed_model_file, tmp_path, monkeypatch, shared / "instance")
    finally:
        shutil.rmtree(shared)


def run_front_door(make_app, seed_model_file, tmp_path, monkeypatch, instance: Path) -> None:
    app = make_app(INSTANCE_PATH=str(instance), SQLALCHEMY_DATABASE_URI=f"sqlite:///{instance / 'app.sqlite'}")
    with app.app_context():
        model_store.init_db()
        model_store.import_model(seed_model_file, name="seed")
    port = free_port()
    settings = FrontDoorSettings(
        socket=str(instance / "gunicorn.sock"),
        port=port,
        max_body="2m",  # over nginx's old 1 MB body buffer
        header_timeout=HEADER_TIMEOUT,
        predict_rate=1,
        predict_burst=2,
    )
    env = {
        "INSTANCE_PATH": str(instance),
        "FLASK_SQLALCHEMY_DATABASE_URI": app.config["SQLALCHEMY_DATABASE_URI"],
        "FLASK_MAX_CONTENT_LENGTH": str(2 * 1024 * 1024),
        "FLASK_PROXY_HOPS": "2",  # the (simulated) TLS terminator, then nginx
        "FLASK_PREDICT_RATE_LIMIT": "50 per minute",
        "WEB_WORKERS": "1",
        "WEB_THREADS": "4",
        "PROMETHEUS_MULTIPROC_DIR": str(instance / "prometheus"),
    }
    drops = os.geteuid() == 0 and nobody_can_run_python()
    if os.geteuid() == 0 and not drops:
        # The operator's explicit choice where nobody cannot run this Python; for both servers.
        monkeypatch.setenv("WEB_USER", "root")
    with serve(settings, env, tmp_path / "logs") as (gunicorn, nginx, run_dir):
        wait_ready("127.0.0.1", port, timeout=600)  # a busy 2-core machine takes minutes to import TensorFlow

        # Started as root, neither server's workers are root.
        if drops:
            workers = child_uids(gunicorn.pid) + child_uids(nginx.pid)
            assert workers and 0 not in workers, workers

        # Behind TLS the session cookie is Secure and __Host- prefixed: nginx passes the
        # terminator's scheme on instead of overwriting it with its own.
        status, headers, _ = call(port, "GET", "/login")
        cookie = dict(headers)["Set-Cookie"]
        assert status == 200 and cookie.startswith("__Host-session=") and "; Secure" in cookie

        # A body over 1 MB (up to the limit) stays in nginx's memory: no temporary file.
        status, _, _ = call(port, "POST", "/api/v1/predict", b"\xff" * 1_500_000, {"Content-Type": "image/jpeg"})
        assert status == 415  # not an image: the app read the whole body and said so
        assert "temporary file" not in (run_dir / "error.log").read_text()

        # A request through it works; the answer comes from the app.
        assert predict(port) == 200

        # Static files come from nginx itself: its expiry header, none of the app's headers.
        status, headers, body = call(port, "GET", "/static/style.css")
        headers = {name.lower(): value for name, value in headers}
        assert status == 200 and body == (ROOT / "static" / "style.css").read_bytes()
        assert "expires" in headers and "content-security-policy" not in headers

        # Over client_max_body_size: 413 from nginx as soon as it reads the headers.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(
                b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 3000000\r\n\r\n"
            )
            answer = raw.recv(65536).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 413")
        assert json.loads(answer.split("\r\n\r\n", 1)[1])["error"]["code"] == "too_large"

        # Over the rate on the prediction route: 429; another address is still served.
        time.sleep(2)  # let the bucket refill after the first prediction
        statuses = [predict(port) for _ in range(6)]
        assert 429 in statuses and statuses[0] == 200
        # The app counts that address by the X-Forwarded-For nginx sets (ProxyFix), not as the
        # proxy: a new address starts its own app bucket of 50.
        status, headers, _ = call(
            port, "POST", "/api/v1/predict", image_bytes(), {"Content-Type": "image/jpeg"}, "127.0.0.2"
        )
        assert status == 200 and dict(headers)["X-RateLimit-Remaining"] == "49"

        # Slow headers: nginx drops the connection after client_header_timeout, and the
        # server keeps answering meanwhile.
        with socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            started = time.monotonic()
            assert call(port, "GET", "/healthz", source="127.0.0.3")[0] == 200
            leftover = slow.recv(65536)
            waited = time.monotonic() - started
        assert b"200 OK" not in leftover
        assert HEADER_TIMEOUT - 0.5 < waited < HEADER_TIMEOUT + 5
