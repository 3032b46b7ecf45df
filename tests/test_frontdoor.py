"""The front door, for real: nginx (Debian's package, installed by .ci/run) in front of gunicorn on
a unix socket, both started on free local ports with this test's own small limits."""

import http.client
import json
import shutil
import socket
import time
from pathlib import Path

import pytest
from helpers import image_bytes

import model_store
from deploy.frontdoor import PLACEHOLDER, ROOT, FrontDoorSettings, nginx_size, render, serve, wait_ready

HEADER_TIMEOUT = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(port, method, path, body=b"", headers=None, source="127.0.0.1"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers=headers or {})
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


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)")
def test_nginx_in_front_of_gunicorn(make_app, seed_model_file, tmp_path):
    app = make_app()
    with app.app_context():
        model_store.init_db()
        model_store.import_model(seed_model_file, name="seed")
    instance = Path(app.instance_path)
    port = free_port()
    settings = FrontDoorSettings(
        socket=str(instance / "gunicorn.sock"),
        port=port,
        max_body="1m",
        header_timeout=HEADER_TIMEOUT,
        predict_rate=1,
        predict_burst=2,
    )
    env = {
        "INSTANCE_PATH": str(instance),
        "FLASK_SQLALCHEMY_DATABASE_URI": app.config["SQLALCHEMY_DATABASE_URI"],
        "FLASK_MAX_CONTENT_LENGTH": str(1024 * 1024),
        "FLASK_PREDICT_RATE_LIMIT": "50 per minute",
        "WEB_WORKERS": "1",
        "WEB_THREADS": "4",
        "PROMETHEUS_MULTIPROC_DIR": str(instance / "prometheus"),
    }
    with serve(settings, env, tmp_path / "logs"):
        wait_ready("127.0.0.1", port, timeout=600)  # a busy 2-core machine takes minutes to import TensorFlow

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
                b"Content-Length: 2000000\r\n\r\n"
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
