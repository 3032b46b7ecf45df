"""Model-card latency: the p50 of `GET /models/<id>` for the shipped model, in process.

The real app (Flask test client) on a temporary SQLite database; the shipped model and its
metrics.json are imported as `make run` imports them (`flask models import`, validated in this
process rather than the sandbox, which changes nothing about the card). The first request is
not counted (template compilation); then `--requests` views are timed one after another.

    python benchmarks/model_card.py [--model models/default/model.h5] [--requests 40]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from app import create_app
from devtools.machine import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/default/model.h5"))
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        app = create_app(
            {
                "INSTANCE_PATH": scratch,
                "SQLALCHEMY_DATABASE_URI": f"sqlite:///{scratch}/card.sqlite",
                "SECRET_KEY": "benchmark",
                "RATELIMIT_ENABLED": False,
                "MODEL_IMPORT_SANDBOX": False,
            }
        )
        runner = app.test_cli_runner()
        for command in (["init-db"], ["models", "import", str(args.model), "--name", "card-benchmark"]):
            result = runner.invoke(args=command)
            if result.exit_code != 0:
                raise SystemExit(result.output)
        client = app.test_client()
        url = "/models/1"
        if client.get(url).status_code != 200:
            raise SystemExit(f"{url} did not answer 200")
        times = []
        for _ in range(args.requests):
            started = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
    times.sort()
    print(
        f"model card {url}: p50 {statistics.median(times):.1f} ms, p90 {times[int(len(times) * 0.9) - 1]:.1f} ms "
        f"over {args.requests} requests ({cpu_model()}, {os.cpu_count()} CPUs)"
    )


if __name__ == "__main__":
    main()
