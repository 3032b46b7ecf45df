"""Soak and fault test against the production server: a mix of good and bad requests, a model
activation in the middle, optionally a worker killed with SIGKILL; then `flask models check`.

Prints the counts by status and error code, the answers checked against the model that gave them
(none may be mixed or lost), and the workers' memory in the first and last quarter of the run.

    python benchmarks/soak.py --model models/default/model.h5 [--requests 2000] [--concurrency 16] [--kill-worker]
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
from serve import ROOT, Server, jpeg_bytes, multipart, prepare_instance, request

sys.path.insert(0, str(ROOT))

VALID_IMAGES = [jpeg_bytes((32, 32), seed=i) for i in range(8)]


def bad_inputs(limit_bytes: int) -> list[tuple[str, bytes, str]]:
    """(label, body, content type) of requests that must get a 4xx."""
    from tests.test_hardening import huge_png, truncated

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
    from serving import load_version

    app = create_app()
    answers = {}
    with app.app_context():
        for row in model_store.list_models():
            loaded = load_version(row, Path(app.config["MODEL_CACHE_DIR"]))
            batch = np.stack([_decode(data, loaded) for data in VALID_IMAGES])
            answers[row.id] = [p.probabilities for p in loaded.predict(batch)]
    return answers


def _decode(data: bytes, loaded) -> np.ndarray:
    from predictor import decode_image

    return decode_image(data, loaded.predictor.spec.image_size)


def add_second_model(instance: Path) -> None:
    """A second, different model to activate mid-run: the shipped one with its weights perturbed."""
    import keras

    import model_store
    from app import create_app

    app = create_app()
    with app.app_context(), tempfile.TemporaryDirectory() as scratch:
        active = model_store.get_active()
        source = model_store.rehydrate(active, Path(scratch))
        model = keras.saving.load_model(source, compile=False)
        rng = np.random.default_rng(0)
        for weight in model.trainable_weights:  # not the batch-norm statistics: a variance must stay positive
            weight.assign(weight + rng.normal(0, 0.05, weight.shape).astype(weight.dtype))
        path = Path(scratch) / "perturbed.h5"
        model.save(path)
        model_store.import_model(path, name="perturbed", metrics=dict(active.metrics))


def send(conn: http.client.HTTPConnection, body: bytes, kind: str) -> tuple[int, bytes]:
    """POST once; on a broken connection (a closed keep-alive, a killed worker) retry once afresh."""
    try:
        return request(conn.port, "POST", "/api/v1/predict", body, kind, conn)
    except (OSError, http.client.HTTPException):
        conn.close()  # http.client opens a new connection on the next request
        RETRIES.append(1)
        return request(conn.port, "POST", "/api/v1/predict", body, kind, conn)


RETRIES: list[int] = []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/default/model.h5")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kill-worker", action="store_true", help="SIGKILL one worker a third of the way in")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak.json")
    args = parser.parse_args()

    instance = prepare_instance(args.model)
    add_second_model(instance)
    answers = expected_answers(instance)
    limit = 16 * 1024 * 1024
    bad = bad_inputs(limit)
    rng = random.Random(0)
    plan = []
    for _ in range(args.requests):
        if rng.random() < 0.7:
            index = rng.randrange(len(VALID_IMAGES))
            if rng.random() < 0.5:
                body, kind = multipart([(f"{index}.jpg", VALID_IMAGES[index])])
            else:
                body, kind = VALID_IMAGES[index], "image/jpeg"
            plan.append(("valid", index, body, kind))
        else:
            label, body, kind = rng.choice(bad)
            plan.append((label, None, body, kind))

    server = Server(instance, workers=2, threads=4, batching=False)
    counts: collections.Counter = collections.Counter()
    mixed, lost, rss_samples = [], [], {}
    lock = threading.Lock()
    cursor = iter(enumerate(plan))
    model_ids = sorted(answers)

    def on_progress(done: int) -> None:
        if done == args.requests // 4:
            rss_samples["first_quarter"] = server.worker_memory_by_pid()
        if done == args.requests // 2:
            subprocess.run(
                [sys.executable, "-m", "flask", "--app", "app", "models", "activate", str(model_ids[-1])],
                cwd=ROOT,
                env={**os.environ, "INSTANCE_PATH": str(instance)},
                check=True,
                capture_output=True,
            )
        if args.kill_worker and done == args.requests // 3:
            victim = server.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)
            counts["killed worker pid"] = victim
        if done == 3 * args.requests // 4:
            rss_samples["last_quarter"] = server.worker_memory_by_pid()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                break
            number, (label, index, body, kind) = item
            try:
                status, payload = send(conn, body, kind)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    lost.append((label, type(exc).__name__))
                    on_progress(number)
                continue
            data = json.loads(payload) if payload.startswith(b"{") else {}
            code = data.get("error", {}).get("code", "ok")
            with lock:
                counts[f"{status} {code} ({label})" if status != 200 else f"200 ok ({label})"] += 1
                if status == 200 and label == "valid":
                    got = data["predictions"][0]["probabilities"]
                    want = answers[data["model"]["id"]][index]
                    if got.keys() != want.keys() or not np.allclose(
                        [got[n] for n in want], list(want.values()), atol=1e-4
                    ):
                        mixed.append((number, data["model"]["id"]))
                on_progress(number)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server.stop()
    check = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "models", "check"],
        cwd=ROOT,
        env={**os.environ, "INSTANCE_PATH": str(instance)},
        capture_output=True,
        text=True,
    )
    statuses = collections.Counter()
    for key, value in counts.items():
        if key[0].isdigit():
            statuses[key.split()[0][0] + "xx"] += value
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "by_status_class": dict(statuses),
        "by_status_and_code": dict(sorted((k, v) for k, v in counts.items() if k[0].isdigit())),
        "killed_worker": counts.get("killed worker pid"),
        "retried_after_connection_error": len(RETRIES),
        "connection_errors_after_retry": len(lost),
        "connection_errors_by_kind": dict(collections.Counter(f"{label}: {kind}" for label, kind in lost)),
        "mixed_or_wrong_answers": len(mixed),
        "worker_rss_mb_by_pid": rss_samples,
        "check_db_exit_code": check.returncode,
        "check_db_output": check.stdout.strip().splitlines(),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    ok = statuses.get("5xx", 0) == 0 and not mixed and check.returncode == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
