"""Soak and fault test against the production server: a mix of good and bad requests, a model
activation in the middle, optionally a worker killed with SIGKILL; then `flask models check`.

With --front-door the server is nginx before gunicorn (`make serve-proxy`) and the mix gains the
costly inputs: 6324x6324 16-bit PNG bombs, model-card plot floods, and 16 slowloris connections
held open all along. Each client thread has its own address on 127.0.0.0/8 (its own nginx rate
bucket) and the app's per-address limit is raised to nginx's, so what is measured is the door.

Prints the counts by status and error code, the answers checked against the model that gave them
(none may be mixed or lost), the valid predictions' p50 and p99, and the workers' memory in the
first and last quarter of the run.

    python benchmarks/soak.py --model models/default/model.h5 [--requests 2000] [--concurrency 16]
        [--kill-worker] [--front-door]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from attacks import front_door, sixteen_bit_png, slow_clients
from serve import jpeg_bytes, multipart

from devtools.devserver import Server, prepare_instance, request, worker_memory_by_pid, worker_pids
from devtools.hostile_files import huge_png, truncated

ROOT = Path(__file__).resolve().parent.parent

VALID_IMAGES = [jpeg_bytes((32, 32), seed=i) for i in range(8)]


def bad_inputs(limit_bytes: int) -> list[tuple[str, bytes, str]]:
    """(label, body, content type) of requests that must get a 4xx."""
    junk = bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8))
    return [
        ("random-bytes", junk, "image/jpeg"),
        ("text", b"not an image\n" * 50, "image/png"),
        ("truncated-jpeg", truncated("JPEG"), "image/jpeg"),
        ("bomb-png", huge_png(), "image/png"),
        ("empty", b"", "image/jpeg"),
        ("wrong-type", VALID_IMAGES[0], "text/plain"),
        ("oversize", b"\xff\xd8" + b"\x00" * (limit_bytes + 1024), "image/jpeg"),
    ]


def expected_answers(instance: Path) -> dict[int, list[dict[str, float]]]:
    """Each registry model's probabilities by class for each valid image, computed in-process."""
    os.environ["INSTANCE_PATH"] = str(instance)
    import model_store
    from app import create_app
    from serving import DecodeBudget, Upload, decode_uploads, load_version

    app = create_app()
    answers = {}
    uploads = [Upload(f"{i}.jpg", data) for i, data in enumerate(VALID_IMAGES)]
    with app.app_context():
        for row in model_store.list_models():
            # Every version, not only the served one: loaded here, scored on the serving path.
            loaded = load_version(row, Path(app.config["MODEL_CACHE_DIR"]))
            decoded = decode_uploads(uploads, [loaded.input_size], DecodeBudget())
            answers[row.id] = [p.probabilities for p in loaded.score(decoded)]
    return answers


def add_second_model(instance: Path) -> None:
    """A second, different model to activate mid-run: the shipped one with its weights perturbed."""
    import model_store
    from app import create_app

    app = create_app()
    with app.app_context(), tempfile.TemporaryDirectory() as scratch:
        active = model_store.get_active()
        model = model_store.load_keras_model(model_store.served_file(active, Path(scratch)))
        rng = np.random.default_rng(0)
        for weight in model.trainable_weights:  # not the batch-norm statistics: a variance must stay positive
            weight.assign(weight + rng.normal(0, 0.05, weight.shape).astype(weight.dtype))
        path = Path(scratch) / "perturbed.h5"
        model.save(path)
        model_store.import_model(path, name="perturbed", metrics=dict(active.metrics))


def send(conn: http.client.HTTPConnection, method: str, path: str, body: bytes, kind: str) -> tuple[int, bytes]:
    """One request; on a broken connection (a closed keep-alive, a killed worker) retry once afresh."""
    try:
        return request(conn.port, method, path, body, kind, conn)
    except (OSError, http.client.HTTPException):
        conn.close()  # http.client opens a new connection on the next request
        RETRIES.append(1)
        return request(conn.port, method, path, body, kind, conn)


RETRIES: list[int] = []
PREDICT = "/api/v1/predict"
FRONT_DOOR_INTERVAL = 0.125  # s between one client's requests: 8 a second, under nginx's 10


def plan_requests(count: int, bad: list[tuple[str, bytes, str]], front: bool) -> list[tuple]:
    """(label, valid image index or None, method, path, body, content type) for each request: 70 %
    valid small images, the rest bad inputs, and with the front door also bombs and plot floods."""
    rng = random.Random(0)
    attacks = bad + ([("bomb-16bit-png", sixteen_bit_png(), "image/png")] if front else [])
    plan = []
    for _ in range(count):
        if rng.random() < 0.7:
            index = rng.randrange(len(VALID_IMAGES))
            if rng.random() < 0.5:
                body, kind = multipart([(f"{index}.jpg", VALID_IMAGES[index])])
            else:
                body, kind = VALID_IMAGES[index], "image/jpeg"
            plan.append(("valid", index, "POST", PREDICT, body, kind))
        elif front and rng.random() < 0.3:
            plan.append(("plot", None, "GET", "/models/1/curves.png", b"", None))
        else:
            label, body, kind = rng.choice(attacks)
            plan.append((label, None, "POST", PREDICT, body, kind))
    return plan


@contextmanager
def running_server(instance: Path, front: bool) -> Iterator[tuple[int, int]]:
    """(port, gunicorn master pid): nginx before gunicorn with the slow clients attached, or
    gunicorn alone with the rate limits off (thousands of requests from one address)."""
    if front:
        with front_door(instance, {"FLASK_PREDICT_RATE_LIMIT": "600 per minute"}) as (port, pid):
            with slow_clients(port) as errors:
                yield port, pid
            if errors:
                print(f"slow clients: {len(errors)} connection errors ({collections.Counter(errors)})")
        return
    server = Server(instance, workers=2, threads=4, batching=False)
    try:
        yield server.port, server.process.pid
    finally:
        server.stop()


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(len(ordered) * share) - 1)], 1) if ordered else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/default/model.h5")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kill-worker", action="store_true", help="SIGKILL one worker a third of the way in")
    parser.add_argument("--front-door", action="store_true", help="through nginx, with bombs, plots, slow clients")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/soak.json (soak-frontdoor.json)")
    args = parser.parse_args()
    if args.front_door and args.kill_worker:
        parser.error("--kill-worker and --front-door: nginx answers the requests a killed worker held with 502")
    if not 1 <= args.concurrency <= 200:
        parser.error("--concurrency: 1 to 200 (each front-door client has its own 127.0.0.x address)")
    out = args.out or ROOT / "benchmarks/results" / ("soak-frontdoor.json" if args.front_door else "soak.json")

    instance = prepare_instance(args.model, "soak-frontdoor" if args.front_door else "bench")
    add_second_model(instance)
    answers = expected_answers(instance)
    plan = plan_requests(args.requests, bad_inputs(16 * 1024 * 1024), args.front_door)
    with running_server(instance, args.front_door) as (port, master_pid):
        counts, mixed, lost, rss_samples, latencies = soak(args, plan, answers, instance, port, master_pid)
    check = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "models", "check"],
        cwd=ROOT,
        env={**os.environ, "INSTANCE_PATH": str(instance)},
        capture_output=True,
        text=True,
    )
    planned_valid = sum(1 for item in plan if item[0] == "valid")
    statuses = collections.Counter()
    for key, value in counts.items():
        if key[0].isdigit():
            statuses[key.split()[0][0] + "xx"] += value
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "front_door": args.front_door,
        "by_status_class": dict(statuses),
        "by_status_and_code": dict(sorted((k, v) for k, v in counts.items() if k[0].isdigit())),
        "killed_worker": counts.get("killed worker pid"),
        "retried_after_connection_error": len(RETRIES),
        "connection_errors_after_retry": len(lost),
        "connection_errors_by_kind": dict(collections.Counter(f"{label}: {kind}" for label, kind in lost)),
        "mixed_or_wrong_answers": len(mixed),
        "valid_planned": planned_valid,
        "valid_predictions": len(latencies),
        "valid_p50_ms": percentile(latencies, 0.5),
        "valid_p99_ms": percentile(latencies, 0.99),
        "worker_rss_mb_by_pid": rss_samples,
        "check_db_exit_code": check.returncode,
        "check_db_output": check.stdout.strip().splitlines(),
    }
    print(json.dumps(result, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    # Valid requests refused (429) or lost would make the latencies a survivor's figure.
    served_enough = len(latencies) >= 0.9 * planned_valid
    ok = statuses.get("5xx", 0) == 0 and not mixed and check.returncode == 0 and served_enough
    return 0 if ok else 1


def soak(args, plan: list[tuple], answers: dict, instance: Path, port: int, master_pid: int) -> tuple:
    """Send the plan from `args.concurrency` clients; counts, mixed answers, lost requests, worker
    memory samples and the valid predictions' latencies in ms."""
    counts: collections.Counter = collections.Counter()
    mixed, lost, latencies, rss_samples = [], [], [], {}
    lock = threading.Lock()
    cursor = iter(enumerate(plan))
    model_ids = sorted(answers)

    def on_progress(done: int) -> None:
        if done == args.requests // 4:
            rss_samples["first_quarter"] = worker_memory_by_pid(master_pid)
        if done == args.requests // 2:
            subprocess.run(
                [sys.executable, "-m", "flask", "--app", "app", "models", "activate", str(model_ids[-1])],
                cwd=ROOT,
                env={**os.environ, "INSTANCE_PATH": str(instance)},
                check=True,
                capture_output=True,
            )
        if args.kill_worker and done == args.requests // 3:
            victim = worker_pids(master_pid)[0]
            os.kill(victim, signal.SIGKILL)
            counts["killed worker pid"] = victim
        if done == 3 * args.requests // 4:
            rss_samples["last_quarter"] = worker_memory_by_pid(master_pid)

    def client(number: int) -> None:
        source = (f"127.0.0.{10 + number}", 0) if args.front_door else None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60, source_address=source)
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                break
            sent, (label, index, method, path, body, kind) = item
            started = time.perf_counter()
            try:
                status, payload = send(conn, method, path, body, kind)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    lost.append((label, type(exc).__name__))
                    on_progress(sent)
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000
            data = json.loads(payload) if payload.startswith(b"{") else {}
            code = data.get("error", {}).get("code", "ok")
            if status == 429:  # who refused: nginx's message speaks of the address, the app's of its limit
                code += " (nginx)" if "your address" in data["error"]["message"] else " (app)"
            with lock:
                counts[f"{status} {code} ({label})" if status != 200 else f"200 ok ({label})"] += 1
                if status == 200 and label == "valid":
                    latencies.append(elapsed_ms)
                    got = data["predictions"][0]["probabilities"]
                    want = answers[data["model"]["id"]][index]
                    if got.keys() != want.keys() or not np.allclose(
                        [got[n] for n in want], list(want.values()), atol=1e-4
                    ):
                        mixed.append((sent, data["model"]["id"]))
                on_progress(sent)
            if args.front_door:  # within nginx's 10 requests a second per address
                time.sleep(max(0.0, FRONT_DOOR_INTERVAL - (time.perf_counter() - started)))
        conn.close()

    threads = [threading.Thread(target=client, args=(number,)) for number in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts, mixed, lost, rss_samples, latencies


if __name__ == "__main__":
    sys.exit(main())
