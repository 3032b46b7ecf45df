"""Serving benchmark: the production server (gunicorn) on a free local port with a given model.

Measures, in one run on one machine:
  1. single small-image requests: requests/s, p50/p99 latency at concurrency 1 and 8;
  2. the same with a 12-megapixel JPEG photo made here;
  3. batch requests of 64 images: images/s;
  4. the model's own in-process rate at batch 64, and the ratio of 3 to it;
  5. the seed's way (save the upload, load the model file, predict) with the same model file,
     and the ratio of 1 (concurrency 8) to it;
  6. memory (RSS) per worker and the server's start-up time to its first answer;
  7. the cost of calibration (issue 11): small-image p50 at concurrency 1 with the model's
     calibration (temperature, OOD features from the same pass) against the same model without,
     alternated twice; the record comes from metrics.json or `--calibration` (a record that
     `benchmarks/calibration_ood.py --save-calibration` writes); skipped when there is none.
  8. the cost of a saliency map (`explain=1`): a small image at concurrency 1 and a batch of 64,
     each against the same request without it;
plus concurrency 8 with dynamic batching on, to decide whether batching helps here.
Prints a table and writes a JSON of the figures.

    python benchmarks/serve.py --model models/default/model.h5 [--seconds 8] [--out benchmarks/results/serve.json]
        [--calibration RECORD.json] [--only-calibration-cost]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from devtools.devserver import Server, prepare_instance, request

ROOT = Path(__file__).resolve().parent.parent
# Servers started for each state in phase 7: one server's p50 varies by a millisecond or two from
# the next one's, as much as calibration costs, so the median of several is compared.
CALIBRATION_ROUNDS = 3
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def jpeg_bytes(size: tuple[int, int], seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG with smooth random content (photo-like enough for the decoder's work)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, size[1] // 64), max(2, size[0] // 64), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def load(
    port: int, body: bytes, content_type: str, concurrency: int, seconds: float, path: str = "/api/v1/predict"
) -> dict:
    """Closed-loop load: `concurrency` clients send requests back to back for `seconds`."""
    latencies: list[float] = []
    errors = []
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status, _ = request(port, "POST", path, body, content_type, conn)
            mine.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
        conn.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
    }


def in_process_rate(model_path: Path, batch: int = 64, seconds: float = 5.0) -> float:
    """The model's own images/s at batch 64 through the serving Predictor (TTA included)."""
    from app import create_app
    from web.extensions import model_serving

    app = create_app()
    model_serving.refresh(app)  # loads the champion here, as a worker's poller does
    with app.app_context():
        loaded = model_serving.slot()
    height, width, _ = loaded.predictor.spec.input_shape
    images = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    loaded.predictor.predict_arrays(images)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loaded.predictor.predict_arrays(images)
        count += batch
    return count / (time.perf_counter() - started)


def seed_way_rate(model_path: Path, image: bytes, repeats: int = 10) -> float:
    """Requests/s the seed's way: save the upload, load_model, preprocess, model.predict, per request."""
    import keras

    timings = []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            upload = Path(scratch) / "upload.jpg"
            upload.write_bytes(image)
            model = keras.saving.load_model(model_path, compile=False)
            pixels = np.asarray(Image.open(upload).convert("RGB").resize((32, 32)), np.float32) / 255.0
            model.predict(pixels[None], verbose=0)
            timings.append(time.perf_counter() - started)
    return 1 / statistics.mean(timings[1:])  # the first call also pays Python imports


def decode_times_ms(photo: bytes) -> dict[str, float]:
    """Median time to turn an upload into model input (32x32): small JPEG, small PNG, 12 MP JPEG."""
    from predictor import decode_upload

    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes((32, 32)))).save(buffer, "PNG")
    cases = {"small_jpeg": jpeg_bytes((32, 32)), "small_png": buffer.getvalue(), "photo12mp_jpeg": photo}
    times = {}
    for name, data in cases.items():
        runs = []
        for _ in range(30 if name != "photo12mp_jpeg" else 10):
            started = time.perf_counter()
            decode_upload(data, (32, 32))
            runs.append(time.perf_counter() - started)
        times[name] = round(1000 * statistics.median(runs), 3)
    return times


def calibration_cost(model_path: Path, instance: Path, record_path: Path | None, body: bytes, seconds: float) -> dict:
    """Small-image p50 (concurrency 1, one worker) with and without the model's calibration."""
    import model_store
    from app import create_app

    with create_app().app_context():
        record = model_store.get_full_calibration(model_store.get_active().id)
        if record_path:
            record = json.loads(record_path.read_text())
        if record is None:
            return {}
        plain = model_store.import_model(model_path, name="bench-plain").id
        calibrated = model_store.import_model(model_path, name="bench-calibrated").id
        model_store.set_calibration(calibrated, record)
    p50: dict[str, list[float]] = {"plain": [], "calibrated": []}
    for name, model_id in (("plain", plain), ("calibrated", calibrated)) * CALIBRATION_ROUNDS:
        with create_app().app_context():
            model_store.activate(model_id)
        server = Server(instance, 1, 1, batching=False)
        try:
            p50[name].append(load(server.port, body, "image/jpeg", 1, seconds)["p50_ms"])
        finally:
            server.stop()
    plain_ms, calibrated_ms = statistics.median(p50["plain"]), statistics.median(p50["calibrated"])
    return {"p50_ms": p50, "ratio_calibrated_to_plain": round(calibrated_ms / plain_ms, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models/default/model.h5")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each load phase")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("WEB_WORKERS", "2")))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("WEB_THREADS", "4")))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve.json")
    parser.add_argument("--calibration", type=Path, help="calibration record JSON for phase 7")
    parser.add_argument("--only-calibration-cost", action="store_true", help="run phase 7 alone")
    args = parser.parse_args()

    instance = prepare_instance(args.model)
    small = jpeg_bytes((32, 32))
    if args.only_calibration_cost:
        cost = calibration_cost(args.model, instance, args.calibration, small, args.seconds)
        print(json.dumps({"machine": f"{os.cpu_count()} CPU cores", "calibration_cost": cost}, indent=2))
        return 0
    photo = jpeg_bytes((4000, 3000), seed=1)
    batch_body, batch_type = multipart([(f"{i}.jpg", jpeg_bytes((32, 32), seed=i)) for i in range(64)])
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.processor() or 'cpu'}",
        "model": str(args.model),
        "workers": args.workers,
        "threads": args.threads,
        "photo_bytes": len(photo),
    }

    cold = Server(instance, args.workers, args.threads, batching=False)
    results["startup_cold_s"] = round(cold.startup_s, 2)
    cold.stop()
    server = Server(instance, args.workers, args.threads, batching=False)
    results["startup_warm_s"] = round(server.startup_s, 2)
    try:
        for name, body in (("small", small), ("photo12mp", photo)):
            for concurrency in (1, 8):
                results[f"{name}_c{concurrency}"] = load(server.port, body, "image/jpeg", concurrency, args.seconds)
        batch = load(server.port, batch_body, batch_type, 2, args.seconds)
        batch["images_per_s"] = round(batch["requests_per_s"] * 64, 1)
        results["batch64_c2"] = batch
        explain = "/api/v1/predict?explain=1"
        results["small_c1_explain"] = load(server.port, small, "image/jpeg", 1, args.seconds, explain)
        batch = load(server.port, batch_body, batch_type, 2, args.seconds, explain)
        batch["images_per_s"] = round(batch["requests_per_s"] * 64, 1)
        results["batch64_c2_explain"] = batch
        results["worker_rss_mb"] = server.worker_memory_mb("Rss")
        results["worker_pss_mb"] = server.worker_memory_mb("Pss")
        results["worker_private_mb"] = server.worker_memory_mb("Private_Dirty")
    finally:
        server.stop()

    batched = Server(instance, args.workers, args.threads, batching=True)
    try:
        results["small_c1_batching"] = load(batched.port, small, "image/jpeg", 1, args.seconds)
        results["small_c8_batching"] = load(batched.port, small, "image/jpeg", 8, args.seconds)
    finally:
        batched.stop()

    results["decode_ms"] = decode_times_ms(photo)
    results["model_in_process_images_per_s"] = round(in_process_rate(args.model), 1)
    results["seed_way_requests_per_s"] = round(seed_way_rate(args.model, small), 2)
    results["ratio_batch_api_to_model"] = round(
        results["batch64_c2"]["images_per_s"] / results["model_in_process_images_per_s"], 3
    )
    results["ratio_c8_to_seed_way"] = round(
        results["small_c8"]["requests_per_s"] / results["seed_way_requests_per_s"], 1
    )
    results["ratio_c8_batching_to_seed_way"] = round(
        results["small_c8_batching"]["requests_per_s"] / results["seed_way_requests_per_s"], 1
    )
    results["explain_p50_ratio_small"] = round(results["small_c1_explain"]["p50_ms"] / results["small_c1"]["p50_ms"], 2)
    results["explain_throughput_ratio_batch64"] = round(
        results["batch64_c2_explain"]["images_per_s"] / results["batch64_c2"]["images_per_s"], 3
    )
    results["batching_speedup_c8"] = round(
        results["small_c8_batching"]["requests_per_s"] / results["small_c8"]["requests_per_s"], 3
    )
    results["calibration_cost"] = calibration_cost(args.model, instance, args.calibration, small, args.seconds)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.out}")
    return 0


def print_table(results: dict) -> None:
    print(f"\nmachine: {results['machine']}; {results['workers']} workers x {results['threads']} threads")
    print(f"{'scenario':<34} {'req/s':>8} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    rows = [
        ("1. small JPEG, concurrency 1", "small_c1"),
        ("1. small JPEG, concurrency 8", "small_c8"),
        ("   concurrency 1, batching on", "small_c1_batching"),
        ("   concurrency 8, batching on", "small_c8_batching"),
        ("2. 12 MP JPEG, concurrency 1", "photo12mp_c1"),
        ("2. 12 MP JPEG, concurrency 8", "photo12mp_c8"),
        ("3. batch of 64, concurrency 2", "batch64_c2"),
        ("7. small JPEG, c1, explain=1", "small_c1_explain"),
        ("7. batch of 64, c2, explain=1", "batch64_c2_explain"),
    ]
    for label, key in rows:
        row = results[key]
        images = row.get("images_per_s", row["requests_per_s"])
        print(
            f"{label:<34} {row['requests_per_s']:>8} {images:>8} {row['p50_ms']:>8} {row['p99_ms']:>8} "
            f"{row['errors']:>6}"
        )
    print(
        f"4. model in-process, batch 64: {results['model_in_process_images_per_s']} img/s; "
        f"batch API / model = {results['ratio_batch_api_to_model']:.0%}"
    )
    print(
        f"5. seed's way: {results['seed_way_requests_per_s']} req/s; concurrency 8 / seed's way = "
        f"{results['ratio_c8_to_seed_way']}x ({results['ratio_c8_batching_to_seed_way']}x with batching)"
    )
    print(
        f"6. worker memory, MB: RSS {results['worker_rss_mb']}, PSS {results['worker_pss_mb']}, "
        f"private {results['worker_private_mb']}; start-up to first answer: "
        f"{results['startup_cold_s']} s cold (rehydrating), {results['startup_warm_s']} s warm"
    )
    print(f"dynamic batching at concurrency 8: {results['batching_speedup_c8']}x the throughput without it")
    print(f"decoding to model input (median ms): {results['decode_ms']}")
    cost = results["calibration_cost"]
    if cost:
        print(
            f"7. calibration and OOD score: small-image p50 {cost['ratio_calibrated_to_plain']}x plain "
            f"({cost['p50_ms']})"
        )
    print(
        f"8. explain=1: small image p50 x{results['explain_p50_ratio_small']} of without; "
        f"batch of 64 at {results['explain_throughput_ratio_batch64']:.0%} of the images/s without"
    )


if __name__ == "__main__":
    sys.exit(main())
