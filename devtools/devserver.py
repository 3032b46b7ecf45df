"""The production server on this machine, for scripts: gunicorn (gunicorn.conf.py) on a free
port with a throwaway instance folder holding a given model, and the headless Chromium that
drives it. The benchmarks, docs/make_screenshot.py and the browser tests share these.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devtools.measure import smaps_rollup_mb

ROOT = Path(__file__).resolve().parent.parent  # the repository, where gunicorn.conf.py is
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def free_port() -> int:
    """A local TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_pids(master_pid: int) -> list[int]:
    """A gunicorn master's children, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master_pid:
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(pids)


def worker_memory_by_pid(master_pid: int, field: str = "Rss") -> dict[int, float]:
    """Per worker pid, in MB, from /proc/PID/smaps_rollup: Rss (all resident pages, shared
    libraries included), Pss (shared pages split between the processes using them) or
    Private_Dirty."""
    sizes = {}
    for pid in worker_pids(master_pid):
        try:
            sizes[pid] = round(smaps_rollup_mb(pid)[field], 1)
        except OSError:
            continue
    return sizes


class Server:
    """gunicorn with gunicorn.conf.py on a free port, on a given instance folder; `root` is the
    checkout whose code it serves (another commit's, for a before-and-after benchmark)."""

    def __init__(self, instance: Path, workers: int, threads: int, batching: bool, root: Path = ROOT):
        self.port = free_port()
        env = dict(os.environ)
        env.update(
            INSTANCE_PATH=str(instance),
            PORT=str(self.port),
            WEB_WORKERS=str(workers),
            WEB_THREADS=str(threads),
            FLASK_BATCHING_ENABLED="true" if batching else "false",
            # Thousands of requests from one address would meet the per-address limit: measured
            # here is serving, so the limits are off.
            FLASK_RATELIMIT_ENABLED="false",
            PROMETHEUS_MULTIPROC_DIR=str(instance / "prometheus"),
            MALLOC_ARENA_MAX=os.environ.get("MALLOC_ARENA_MAX", "2"),
        )
        started = time.perf_counter()
        # A file, not a pipe: an unread pipe fills up and then blocks the workers' logging.
        self.log_path = instance / f"gunicorn-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"],
                cwd=root,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.startup_s = self._wait_ready(started)

    def _wait_ready(self, started: float, timeout: float = 300) -> float:
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError("gunicorn exited: " + self.log_path.read_text(errors="replace")[-2000:])
            try:
                status, _ = request(self.port, "GET", "/healthz")
                if status == 200:
                    return time.perf_counter() - started
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("gunicorn did not become ready")

    def worker_pids(self) -> list[int]:
        return worker_pids(self.process.pid)

    def worker_memory_by_pid(self, field: str = "Rss") -> dict[int, float]:
        return worker_memory_by_pid(self.process.pid, field)

    def worker_memory_mb(self, field: str = "Rss") -> list[float]:
        return list(self.worker_memory_by_pid(field).values())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    content_type: str | None = None,
    connection: http.client.HTTPConnection | None = None,
):
    """(status, body) of one request to the local server, on `connection` when given."""
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": content_type} if content_type else {}
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    if connection is None:
        conn.close()
    return response.status, data


def prepare_instance(model_path: Path, name: str = "bench") -> Path:
    """A new instance folder (INSTANCE_PATH from now on) with the model imported and active."""
    instance = Path(tempfile.mkdtemp(prefix="bench-instance-"))
    os.environ["INSTANCE_PATH"] = str(instance)
    import model_store
    from app import create_app
    from registry import metrics_schema

    app = create_app()
    with app.app_context():
        model_store.init_db()
        sidecar = model_path.with_name("metrics.json")
        # With its calibration whole: the OOD arrays are in calibration.safetensors beside it.
        metrics = metrics_schema.read_metrics(sidecar) if sidecar.exists() else {}
        model_store.import_model(model_path, name=name, metrics=metrics, activate=True)
    return instance
