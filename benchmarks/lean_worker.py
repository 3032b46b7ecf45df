"""The web worker before and after the lean engine (issue 21), in one run on one machine.

"old" is the app at `--baseline` (a commit whose workers serve with TensorFlow), checked out in a
temporary git worktree; "new" is this checkout (LiteRT, no TensorFlow in a worker). Each gets its
own instance folder with `--model` imported by its own code, and the production server
(gunicorn.conf.py, `--workers` x `--threads`), alternated `--rounds` times. Measured:

  1. start-up to the first answer of /healthz (the server's clock, model loaded), per round;
  2. worker memory once loaded and warm: PSS and RSS per worker (/proc/PID/smaps_rollup);
  3. one small JPEG through the API: p50 at concurrency 1, requests/s at concurrency 8;
  4. in this process, the model's own time for one small image with its test-time views (the
     model call alone: TensorFlow's tf.function against the worker's LiteEngine), and the whole
     scoring (views, call, calibration and OOD arithmetic); and the engine alone called by 8
     threads with one image each (calls/s), the ceiling for the API's c8 figure.

    python benchmarks/lean_worker.py [--model models/default/model.h5] [--baseline 26b0afc]
        [--seconds 6] [--rounds 2] [--out benchmarks/results/lean_worker.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from serve import jpeg_bytes, load  # noqa: E402

from devtools.devserver import Server  # noqa: E402
from devtools.machine import cpu_model  # noqa: E402
from devtools.measure import p50_ms  # noqa: E402

# The last commit whose workers served with TensorFlow (before the lean engine was wired in).
DEFAULT_BASELINE = "26b0afc"
# Calls per timed p50 of the model call and of the scoring.
REPEATS = 300
# Both checkouts' code imports the model, with its calibration whole (calibration.safetensors).
PREPARE = """
import os, sys, tempfile
from pathlib import Path
instance = Path(tempfile.mkdtemp(prefix="bench-instance-"))
os.environ["INSTANCE_PATH"] = str(instance)
import model_store
from app import create_app
from registry import metrics_schema
model = Path(sys.argv[1])
with create_app().app_context():
    model_store.init_db()
    metrics = metrics_schema.read_metrics(model.with_name("metrics.json"))
    model_store.import_model(model, name="bench", metrics=metrics, activate=True)
print(instance)
"""


def prepared_instance(root: Path, model: Path) -> Path:
    """An instance folder with `model` imported and active by the code at `root`."""
    result = subprocess.run(
        [sys.executable, "-c", PREPARE, str(model)], cwd=root, capture_output=True, text=True, check=True
    )
    return Path(result.stdout.strip().splitlines()[-1])


def serve_and_load(root: Path, instance: Path, args, body: bytes) -> dict:
    """One server's start-up, memory and small-image figures."""
    server = Server(instance, args.workers, args.threads, batching=False, root=root)
    try:
        figures = {"startup_s": round(server.startup_s, 2)}
        figures["c1"] = load(server.port, body, "image/jpeg", 1, args.seconds)
        figures["c8"] = load(server.port, body, "image/jpeg", 8, args.seconds)
        figures["worker_pss_mb"] = server.worker_memory_mb("Pss")
        figures["worker_rss_mb"] = server.worker_memory_mb("Rss")
    finally:
        server.stop()
    return figures


def threaded_calls_per_s(call, threads: int, seconds: float) -> float:
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def run(index: int) -> None:
        while time.perf_counter() < deadline:
            call()
            counts[index] += 1

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return round(sum(counts) / (time.perf_counter() - started), 1)


def engine_figures(instance: Path, seconds: float) -> dict:
    """The model call alone and the whole scoring, TensorFlow's path against the worker's, in this process."""
    os.environ["INSTANCE_PATH"] = str(instance)
    import model_store
    from app import create_app
    from inference.calibration import Calibration
    from predictor import Predictor, scale_pixels, tta_views
    from serving import load_version, spec_of

    with create_app().app_context() as context:
        row = model_store.get_active()
        cache = Path(context.app.config["MODEL_CACHE_DIR"])
        lean = load_version(row, cache).predictor
        keras_model = model_store.load_keras_model(model_store.served_file(row, cache))
        calibration = Calibration.from_record(model_store.get_full_calibration(row.id))
        tensorflow = Predictor(keras_model, spec_of(row), calibration)
    image = np.random.default_rng(0).integers(0, 256, (1, *lean.spec.input_shape), dtype=np.uint8)
    views, _ = tta_views(scale_pixels(image, lean.spec.input_scale), lean.spec.tta)
    figures = {"views": len(views)}
    for name, predictor in (("tensorflow", tensorflow), ("litert", lean), ("tensorflow", tensorflow), ("litert", lean)):
        figures.setdefault(name, {"model_call_p50_ms": [], "scoring_p50_ms": []})
        figures[name]["model_call_p50_ms"].append(p50_ms(lambda p=predictor: p._forward(views), REPEATS))
        figures[name]["scoring_p50_ms"].append(p50_ms(lambda p=predictor: p.score_arrays(image), REPEATS))
    figures["litert"]["c8_calls_per_s"] = threaded_calls_per_s(lambda: lean._forward(views), 8, seconds)
    figures["litert"]["c8_scorings_per_s"] = threaded_calls_per_s(lambda: lean.score_arrays(image), 8, seconds)
    return figures


def summary(results: dict) -> dict:
    """The issue's targets from the figures (medians over rounds)."""
    old, new, engines = results["old"], results["new"], results["engines"]

    def median(engine: dict, *keys) -> float:
        return statistics.median(value for round_ in engine for value in _dig(round_, keys))

    engine_ms = statistics.median(engines["litert"]["model_call_p50_ms"])
    return {
        "model_call_litert_over_tensorflow": round(
            engine_ms / statistics.median(engines["tensorflow"]["model_call_p50_ms"]), 3
        ),
        "api_p50_c1_over_engine_call": round(median(new, "c1", "p50_ms") / engine_ms, 2),
        "api_c8_new_over_old": round(median(new, "c8", "requests_per_s") / median(old, "c8", "requests_per_s"), 2),
        "api_c8_over_engine_alone_c8": round(
            median(new, "c8", "requests_per_s") / engines["litert"]["c8_calls_per_s"], 3
        ),
        "worker_pss_mb_new": max(value for round_ in new for value in round_["worker_pss_mb"]),
        "worker_pss_mb_old": max(value for round_ in old for value in round_["worker_pss_mb"]),
        "startup_s_new": median(new, "startup_s"),
        "startup_s_old": median(old, "startup_s"),
    }


def _dig(figures: dict, keys: tuple) -> list:
    for key in keys:
        figures = figures[key]
    return figures if isinstance(figures, list) else [figures]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/default/model.h5")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="the commit serving with TensorFlow")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lean_worker.json")
    args = parser.parse_args()
    model = args.model.resolve()
    body = jpeg_bytes((32, 32))
    results: dict = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "baseline": args.baseline,
        "workers": args.workers,
        "threads": args.threads,
        "old": [],
        "new": [],
    }
    with tempfile.TemporaryDirectory(prefix="lean-baseline-") as scratch:
        old_root = Path(scratch) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old_root), args.baseline], cwd=ROOT, check=True)
        try:
            instances = {"old": prepared_instance(old_root, model), "new": prepared_instance(ROOT, model)}
            roots = {"old": old_root, "new": ROOT}
            for _ in range(args.rounds):
                for name in ("old", "new"):
                    results[name].append(serve_and_load(roots[name], instances[name], args, body))
                    print(name, json.dumps(results[name][-1]), flush=True)
            results["engines"] = engine_figures(instances["new"], args.seconds)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_root)], cwd=ROOT, check=False)
    results["load_average_at_end"] = os.getloadavg()
    results["summary"] = summary(results)
    print(json.dumps(results["engines"], indent=1))
    print(json.dumps(results["summary"], indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
