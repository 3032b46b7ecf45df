"""What the front-door benchmarks share: the server as `make serve-proxy` runs it, and the costly
inputs an attacker sends (a 16-bit PNG bomb, slowloris connections, one-shot requests from a
chosen source address on 127.0.0.0/8, so that each client has its own rate-limit bucket)."""

from __future__ import annotations

import http.client
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from deploy.frontdoor import FrontDoorSettings, serve, wait_ready
from devtools.devserver import free_port

ROOT = Path(__file__).resolve().parent.parent

HOST = "127.0.0.1"


@contextmanager
def front_door(instance: Path, extra_env: dict[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """nginx on a free port before gunicorn (2 workers x 4 threads, as `make run`) on a socket;
    yields (nginx port, gunicorn master pid) once /healthz answers through nginx."""
    port = free_port()
    settings = FrontDoorSettings(socket=str(instance / "gunicorn.sock"), port=port)
    env = {
        "INSTANCE_PATH": str(instance),
        "WEB_WORKERS": "2",
        "WEB_THREADS": "4",
        "PROMETHEUS_MULTIPROC_DIR": str(instance / "prometheus"),
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),
        **(extra_env or {}),
    }
    with serve(settings, env, instance / "logs") as (gunicorn, _nginx, _run_dir):
        wait_ready(HOST, port, timeout=900)
        yield port, gunicorn.pid


def call(port: int, method: str, path: str, body=b"", content_type=None, source=HOST, timeout=60):
    """(status, seconds) of one request on a new connection from `source`; status 0: no answer."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout, source_address=(source, 0))
    try:
        connection.request(method, path, body=body, headers={"Content-Type": content_type} if content_type else {})
        response = connection.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    except (OSError, http.client.HTTPException):
        return 0, time.perf_counter() - started
    finally:
        connection.close()


def sixteen_bit_png(side: int = 6324) -> bytes:
    """A flat 16-bit greyscale PNG: about 90 KB on the wire, 40 MP once decoded."""
    buffer = io.BytesIO()
    Image.new("I;16", (side, side), 1000).save(buffer, "PNG")
    return buffer.getvalue()


def slowloris(port: int, count: int) -> list[socket.socket]:
    """Connections that send part of a request line and then nothing (all or none: an error
    closes those already opened)."""
    held: list[socket.socket] = []
    try:
        for _ in range(count):
            held.append(socket.create_connection((HOST, port), timeout=5))
            held[-1].sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: ")
    except OSError:
        for sock in held:
            sock.close()
        raise
    return held


@contextmanager
def slow_clients(port: int, count: int = 16, hold_seconds: float = 2.0) -> Iterator[list[str]]:
    """`count` slowloris connections, dropped and opened afresh every `hold_seconds`, until the
    block ends; yields a list that collects the errors met opening them (a refused connection is
    the server defending itself, and the run goes on)."""
    stop = threading.Event()
    errors: list[str] = []

    def cycle() -> None:
        while not stop.is_set():
            try:
                held = slowloris(port, count)
            except OSError as exc:
                errors.append(type(exc).__name__)
                stop.wait(0.1)
                continue
            stop.wait(hold_seconds)
            for sock in held:
                sock.close()

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield errors
    finally:
        stop.set()
        thread.join()
