"""gunicorn settings for `make serve`: threaded workers, each with a thread that loads and warms the models.

Environment: HOST (127.0.0.1), PORT (8000), WEB_WORKERS (2), WEB_THREADS (4), WEB_TIMEOUT (60);
WEB_BIND (e.g. unix:instance/gunicorn.sock, as deploy/frontdoor.py sets it) replaces HOST and PORT.
Started as root, the workers run as WEB_USER (default nobody), who is given the instance folder.
"""

import os
import shutil
from pathlib import Path

from deploy.frontdoor import give_to, service_account

bind = os.environ.get("WEB_BIND") or f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_WORKERS", "2"))
threads = int(os.environ.get("WEB_THREADS", "4"))
worker_class = "gthread"
timeout = int(os.environ.get("WEB_TIMEOUT", "60"))
graceful_timeout = 30
accesslog = os.environ.get("WEB_ACCESS_LOG") or None
wsgi_app = "app:create_app()"

# The workers parse uploads and run the model: never as root. (The master, which only binds and
# supervises, stays root; gunicorn hands the unix socket to the workers' user.)
_account = service_account()
if _account:
    user, group = _account.pw_uid, _account.pw_gid
_instance = Path(os.environ.get("INSTANCE_PATH", "instance"))

# Prometheus' multi-process mode needs a folder shared by the workers, set before they import
# prometheus_client; it is emptied at each start so old workers' samples do not linger.
_metrics_dir = Path(os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(_instance / "prometheus")))


def on_starting(server):
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    _metrics_dir.mkdir(parents=True, exist_ok=True)
    if _account:
        for folder in {_instance, _metrics_dir}:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            give_to(_account, folder)
    # The app refuses to serve anonymously on a non-loopback address (web/auth.py); it learns the
    # addresses from here, whether they came from HOST/PORT or from `gunicorn -b`.
    os.environ["SERVER_BIND"] = ",".join(server.cfg.bind)


def post_worker_init(worker):
    """Start the worker's registry poller; let its first load finish (or fail) before the worker
    takes traffic, within half the worker timeout, so gunicorn does not kill a slow starter."""
    from web.extensions import model_serving

    model_serving.start(worker.wsgi, wait_seconds=timeout / 2)


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
