"""What a challenger costs a worker: its memory with one model and with two (RSS and PSS, from
/proc), and the champion's request latency with no challenger and with a shadow at sample 1.0,
in the same run, through the real app's API (Flask's test client, one request at a time).

The shipped model is imported twice into a scratch registry (the challenger is the same weights
imported again); requests are CIFAR-10 test images. The shadow's scoring runs on the worker's
off-path thread, so on a machine without a spare core it competes with the answers for the CPU.

    python benchmarks/rollout_cost.py --requests 200
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from devtools.machine import cpu_model  # noqa: E402
from devtools.measure import smaps_rollup_mb  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def memory_mb() -> dict[str, float]:
    """This process's resident and proportional set sizes, in MB."""
    fields = smaps_rollup_mb()
    return {"rss": fields["Rss"], "pss": fields["Pss"]}


def test_jpegs(archive: Path, count: int) -> list[bytes]:
    files = []
    with tarfile.open(archive) as tar:
        for member in tar:
            if member.isfile() and "/test/" in f"/{member.name}":
                files.append(tar.extractfile(member).read())
                if len(files) == count:
                    break
    return files


def timed_requests(client, images: list[bytes]) -> list[float]:
    latencies = []
    for data in images:
        started = time.perf_counter()
        response = client.post("/api/v1/predict", data={"image": (io.BytesIO(data), "x.jpg")})
        latencies.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.get_data(as_text=True)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default" / "model.h5")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rollout_cost.json")
    args = parser.parse_args()

    import model_store
    from app import create_app
    from registry import metrics_schema
    from rollout import state as rollout_state
    from web.extensions import model_serving

    metrics = metrics_schema.read_metrics(args.model.with_name("metrics.json"))
    images = test_jpegs(args.data, args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(
            {
                "INSTANCE_PATH": scratch,
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{scratch}/bench.sqlite",
                "MODEL_IMPORT_SANDBOX": False,
                "MODEL_POLL_SECONDS": 0,
                "RATELIMIT_ENABLED": False,
                "ROLLOUT_QUEUE_SIZE": args.requests,  # nothing dropped: the cost of scoring every request
            }
        )
        with app.app_context():
            model_store.init_db()
            model_store.import_model(args.model, name="champion", metrics=dict(metrics), activate=True)
            challenger_id = model_store.import_model(args.model, name="challenger", metrics=dict(metrics)).id
        model_serving.refresh(app)
        client = app.test_client()
        timed_requests(client, images[:10])  # warm both paths
        one = memory_mb()
        alone = timed_requests(client, images)
        with app.app_context():
            rollout_state.start_shadow(challenger_id, 1.0, "benchmark")
        model_serving.refresh(app)
        timed_requests(client, images[:10])
        two = memory_mb()
        shadowed = timed_requests(client, images)
        worker = app.extensions["rollout"].worker
        worker.wait_idle(600)
        model_serving.stop(app)
    record = {
        "cpu": cpu_model(),
        "requests": args.requests,
        "memory_one_model_mb": one,
        "memory_two_models_mb": two,
        "p50_ms": {"alone": float(np.percentile(alone, 50)), "shadow": float(np.percentile(shadowed, 50))},
        "p95_ms": {"alone": float(np.percentile(alone, 95)), "shadow": float(np.percentile(shadowed, 95))},
        "offpath_jobs": dict(worker.counts),
    }
    args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
