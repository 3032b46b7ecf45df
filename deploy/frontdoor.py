"""The front door: nginx on PORT in front of gunicorn on a unix socket in the instance folder.

`make serve-proxy` runs `python deploy/frontdoor.py`: both servers in the foreground, Ctrl-C (or
SIGTERM) stops both, and either one exiting stops the other. The nginx config is rendered from
deploy/nginx.conf.template into a private temporary folder (pid, logs, request bodies), with
client_max_body_size taken from the app's MAX_CONTENT_LENGTH. Tests and benchmarks use `serve`
with their own settings.

HOST is checked as gunicorn checks its own bind: on an address other than loopback, anonymous use
must be set on or off on purpose (web/auth.py), or nothing starts. Started as root, nginx's and
gunicorn's workers run as WEB_USER (default `nobody`), who is given the instance folder.

Environment: HOST (127.0.0.1), PORT (8080), INSTANCE_PATH, WEB_USER, and gunicorn's WEB_*
(gunicorn.conf.py).
"""

from __future__ import annotations

import grp
import http.client
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).with_name("nginx.conf.template")
PLACEHOLDER = re.compile(r"@([A-Z_]+)@")


@dataclass(frozen=True)
class FrontDoorSettings:
    """What the nginx config is rendered with (times in seconds, rates per address)."""

    socket: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_body: str = "16m"
    header_timeout: int = 10
    body_timeout: int = 15
    proxy_timeout: int = 30
    predict_rate: int = 10  # per second
    predict_burst: int = 20
    login_rate: int = 10  # per minute
    connections_per_address: int = 64
    static_root: str = str(ROOT / "static")


def service_account() -> pwd.struct_passwd | None:
    """Whom the servers' workers run as when started as root: WEB_USER (default nobody; root keeps
    them root on purpose); None when not started as root.

    The workers import Python and the app after the drop, so the account must reach them. A
    WEB_USER that cannot is refused; the default `nobody`, when it cannot (Python installed in
    root's 0700 home, as on this project's build machines), is skipped with a warning rather than
    leaving `make run` unable to start."""
    if os.geteuid() != 0:
        return None
    chosen = os.environ.get("WEB_USER")
    account = pwd.getpwnam(chosen or "nobody")
    blocked = unreachable_paths(account)
    if not blocked:
        return account
    problem = f"{account.pw_name} cannot read {', '.join(blocked)}, which the workers import from"
    if chosen:
        raise SystemExit(f"WEB_USER={chosen}: {problem}; make them readable or choose another user")
    print(f"warning: the workers stay root: {problem} (set WEB_USER to a user who can)", file=sys.stderr)
    return None


def unreachable_paths(account: pwd.struct_passwd) -> list[str]:
    """The Python installation and source folders `account` cannot enter."""
    return unreachable_paths_of(account, [Path(sys.prefix), Path(sys.base_prefix), ROOT])


def unreachable_paths_of(account: pwd.struct_passwd, paths: list[Path]) -> list[str]:
    """Those of `paths` that `account` cannot enter."""
    return sorted({str(path) for path in paths if not _can_enter(account, path)})


def _can_enter(account: pwd.struct_passwd, path: Path) -> bool:
    """Whether `account` may search every folder from / down to `path` (by the permission bits)."""
    groups = {account.pw_gid, *(group.gr_gid for group in grp.getgrall() if account.pw_name in group.gr_mem)}
    for folder in (*reversed(path.resolve().parents), path.resolve()):
        mode = folder.stat()
        if mode.st_uid == account.pw_uid:
            allowed = mode.st_mode & 0o100
        elif mode.st_gid in groups:
            allowed = mode.st_mode & 0o010
        else:
            allowed = mode.st_mode & 0o001
        if not allowed:
            return False
    return True


def give_to(account: pwd.struct_passwd, folder: Path) -> None:
    """`folder` and everything in it to `account`: the workers write there (database, models,
    secret key, metrics), and a folder made by root (make db, a test) would shut them out."""
    for path in (folder, *folder.rglob("*")):
        os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)


def nginx_size(size_bytes: int) -> str:
    """A byte count as nginx writes sizes: '16m' when it is whole megabytes."""
    megabytes, rest = divmod(int(size_bytes), 1024 * 1024)
    return f"{megabytes}m" if megabytes and not rest else str(int(size_bytes))


def render(settings: FrontDoorSettings, run_dir: Path) -> str:
    """The nginx config text; every placeholder must be filled."""
    values = {key.upper(): str(value) for key, value in asdict(settings).items()}
    values["RUN_DIR"] = str(run_dir)
    account = service_account()
    # As root, nginx's workers (which parse every request) run as the account gunicorn's run as.
    values["USER_LINE"] = f"user {account.pw_name} {grp.getgrgid(account.pw_gid).gr_name};" if account else ""
    missing = sorted(set(PLACEHOLDER.findall(TEMPLATE.read_text())) - set(values))
    if missing:
        raise KeyError(f"no value for {', '.join(missing)} in {TEMPLATE.name}")
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], TEMPLATE.read_text())


def _stop(process: subprocess.Popen, grace: float = 30) -> None:
    if process.poll() is None:
        process.terminate()  # SIGTERM: nginx and gunicorn both stop gracefully on it
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_for_socket(path: Path, gunicorn: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if gunicorn.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn did not open {path}")
        time.sleep(0.05)


def wait_ready(host: str, port: int, timeout: float = 120) -> None:
    """Until /healthz through nginx answers 200 (the workers have loaded the model)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection(host, port, timeout=5)
        try:
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            connection.close()
        time.sleep(0.1)
    raise RuntimeError(f"http://{host}:{port}/healthz did not answer 200 in {timeout:.0f} s")


def bind_address(host: str, port: int) -> str:
    """host:port as gunicorn writes a bind ([::1]:8080 for an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextmanager
def serve(settings: FrontDoorSettings, env: dict[str, str], log_dir: Path) -> Iterator[tuple]:
    """Start gunicorn on `settings.socket`, then nginx with the rendered config; stop both on exit.

    Yields (gunicorn, nginx, run_dir). Logs go to files in `log_dir` (an unread pipe would
    block the servers)."""
    run_dir = Path(tempfile.mkdtemp(prefix="imgcls-nginx-"))
    account = service_account()
    if account:
        give_to(account, run_dir)
    socket_path = Path(settings.socket)
    socket_path.unlink(missing_ok=True)
    config = run_dir / "nginx.conf"
    config.write_text(render(settings, run_dir))
    log_dir.mkdir(parents=True, exist_ok=True)
    # nginx is the one proxy: the app takes the client's address from its X-Forwarded-For.
    gunicorn_env = {"FLASK_PROXY_HOPS": "1", **os.environ, **env, "WEB_BIND": f"unix:{socket_path}"}
    gunicorn_command = [str(Path(sys.executable).parent / "gunicorn"), "-c", "gunicorn.conf.py"]
    nginx_command = [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(run_dir), "-c", str(config)]
    processes: list[subprocess.Popen] = []
    try:
        with (log_dir / "gunicorn.log").open("ab") as log:
            processes.append(subprocess.Popen(gunicorn_command, cwd=ROOT, env=gunicorn_env, stdout=log, stderr=log))
        _wait_for_socket(socket_path, processes[0])
        with (log_dir / "nginx.log").open("ab") as log:
            processes.append(subprocess.Popen(nginx_command, cwd=run_dir, stdout=log, stderr=log))
        yield processes[0], processes[1], run_dir
    finally:
        for process in reversed(processes):  # nginx first: no new requests reach a stopping gunicorn
            _stop(process)
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> int:
    from app import create_app
    from web.auth import exposure_problem

    app = create_app()
    instance = Path(app.instance_path)
    settings = FrontDoorSettings(
        socket=str(instance / "gunicorn.sock"),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8080")),
        max_body=nginx_size(app.config["MAX_CONTENT_LENGTH"]),
    )
    # gunicorn checks only its own bind, a unix socket here: the public address is nginx's.
    problem = exposure_problem(app.config, bind_address(settings.host, settings.port))
    if problem:
        print(problem, file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop both, as Ctrl-C does
    env = {"INSTANCE_PATH": str(instance)}
    with serve(settings, env, instance / "logs") as (gunicorn, nginx, _run_dir):
        print(f"nginx on http://{settings.host}:{settings.port} -> gunicorn on {settings.socket}; Ctrl-C stops both")
        print(f"logs: {instance / 'logs'}", flush=True)
        try:
            while gunicorn.poll() is None and nginx.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
    print("one of the servers exited; both are stopped (see the logs)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
