"""Front-door benchmark: costly inputs through nginx (make serve-proxy's set-up) on 127.0.0.1.

Measures, in one run on one machine, with gunicorn as `make run` starts it (2 workers x 4 threads):
  1. 64 slowloris connections held open while /healthz is timed (baseline: /healthz without them);
  2. a client over the prediction rate gets 429 while another address is served;
  3. a 6324x6324 16-bit PNG (made here, about 90 KB): answer time and extra worker memory;
  4. eight concurrent requests of eight such files: every answer's time, each worker's peak memory;
  5. a model-card plot: first and second request;
  6. an attack mix (bombs, plot floods, slow clients) while valid small predictions are timed
     from another address: 5xx count and p99.
Every phase is bounded in time. Prints a table and writes a JSON of the figures.

    python benchmarks/frontdoor.py --model models/default/model.h5 [--out benchmarks/results/frontdoor.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from attacks import ROOT, call, front_door, sixteen_bit_png, slow_clients, slowloris
from serve import jpeg_bytes, multipart

from devtools.devserver import prepare_instance, worker_pids


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed_healthz(port: int, times: int) -> list[float]:
    return [round(call(port, "GET", "/healthz", timeout=10)[1] * 1000, 1) for _ in range(times)]


def phase_slowloris(port: int) -> dict:
    baseline = timed_healthz(port, 5)
    held = slowloris(port, 64)
    try:
        during = timed_healthz(port, 5)
    finally:
        for sock in held:
            sock.close()
    return {"connections": 64, "healthz_ms_without": baseline, "healthz_ms_during": during}


def phase_rate(port: int, image: bytes) -> dict:
    time.sleep(3)  # a full bucket
    with ThreadPoolExecutor(8) as pool:  # 80 requests as fast as 8 connections go: over 10/s
        flood = list(pool.map(lambda _: call(port, "POST", "/api/v1/predict", image, "image/jpeg")[0], range(80)))
    other = [call(port, "POST", "/api/v1/predict", image, "image/jpeg", source="127.0.0.2")[0] for _ in range(5)]
    return {
        "flooding_client": {str(s): flood.count(s) for s in sorted(set(flood))},
        "other_client": {str(s): other.count(s) for s in sorted(set(other))},
    }


def phase_bomb(port: int, workers: list[int], png: bytes) -> dict:
    before = {pid: memory_mb(pid, "VmRSS") for pid in workers}
    # Its own address: the rate phase just emptied 127.0.0.1's nginx bucket.
    answers = [call(port, "POST", "/api/v1/predict", png, "image/png", source="127.0.0.5") for _ in range(3)]
    extra = max(memory_mb(pid, "VmHWM") - before[pid] for pid in workers)
    return {
        "png_bytes": len(png),
        "statuses": [status for status, _ in answers],
        "seconds": [round(seconds, 3) for _, seconds in answers],
        "extra_worker_peak_mb": round(extra, 1),
    }


def phase_eight_by_eight(port: int, workers: list[int], png: bytes) -> dict:
    body, content_type = multipart([(f"{i}.png", png) for i in range(8)])
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: call(port, "POST", "/api/v1/predict", body, content_type, source="127.0.0.6"), range(8))
        )
    return {
        "upload_bytes_each": len(body),
        "statuses": [status for status, _ in answers],
        "max_seconds": round(max(seconds for _, seconds in answers), 3),
        "worker_peak_mb": [round(memory_mb(pid, "VmHWM"), 1) for pid in workers],
    }


def phase_plots(port: int) -> dict:
    first = call(port, "GET", "/models/1/confusion.png")
    second = [call(port, "GET", "/models/1/confusion.png") for _ in range(5)]
    return {
        "status": first[0],
        "first_ms": round(first[1] * 1000, 1),
        "second_ms": [round(seconds * 1000, 1) for _, seconds in second],
    }


def phase_attack_mix(port: int, image: bytes, png: bytes, seconds: float) -> dict:
    """Attackers on 127.0.0.1 (bombs, plot floods, slow clients) while a client on 127.0.0.3
    sends valid small predictions; every status is counted."""
    stop = time.monotonic() + seconds
    statuses: list[int] = []
    latencies: list[float] = []
    lock = threading.Lock()

    def attacker(kind: str) -> None:
        while time.monotonic() < stop:
            if kind == "bomb":
                status, _ = call(port, "POST", "/api/v1/predict", png, "image/png")
            else:
                status, _ = call(port, "GET", "/models/1/curves.png")
            with lock:
                statuses.append(status)

    def valid_client() -> None:
        while time.monotonic() < stop:
            status, elapsed = call(port, "POST", "/api/v1/predict", image, "image/jpeg", source="127.0.0.3")
            with lock:
                statuses.append(status)
                if status == 200:
                    latencies.append(elapsed * 1000)
            time.sleep(0.1)  # within the per-address rate

    kinds = ["bomb", "bomb", "plot", "plot", "plot", "plot"]
    threads = [threading.Thread(target=attacker, args=(kind,)) for kind in kinds]
    threads.append(threading.Thread(target=valid_client))
    with slow_clients(port):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    latencies.sort()
    return {
        "seconds": seconds,
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "server_errors": sum(1 for s in statuses if s >= 500 or s == 0),
        "valid_predictions": len(latencies),
        "valid_p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "valid_p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)], 1) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--mix-seconds", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "frontdoor.json")
    args = parser.parse_args()
    instance = prepare_instance(args.model.resolve(), "frontdoor")
    image, png = jpeg_bytes((32, 32)), sixteen_bit_png()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    results = {
        "machine": {
            "cpu": next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        }
    }
    with front_door(instance) as (port, gunicorn_pid):
        workers = worker_pids(gunicorn_pid)
        for _ in range(3):  # both workers warm
            call(port, "POST", "/api/v1/predict", image, "image/jpeg", source="127.0.0.4")
        results["slowloris"] = phase_slowloris(port)
        results["rate"] = phase_rate(port, image)
        results["bomb_16bit_png"] = phase_bomb(port, workers, png)
        results["eight_by_eight"] = phase_eight_by_eight(port, workers, png)
        results["plots"] = phase_plots(port)
        results["attack_mix"] = phase_attack_mix(port, image, png, args.mix_seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
