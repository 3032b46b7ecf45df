"""Serving engines side by side: TensorFlow (the app's tf.function path today) against LiteRT fp32
(lite_engine), for one Keras model, in one run on one machine.

Measures:
  1. the model's own time for one small image with its test-time views (the model's `tta`):
     p50 of the model call alone, both engines, alternated;
  2. images/s at batch 64 (with their views);
  3. the largest absolute difference of the outputs (logits, OOD features) on random images, the
     share of them given the same top class, and of Grad-CAM maps against inference/explain.py's;
  4. process PSS, RSS and USS (/proc/self/smaps_rollup) and start to first answer of a fresh
     process that loads only what serving needs: the engine and the converted file, or
     TensorFlow, Keras and the model file (each in its own subprocess, timed from its start);
  5. dynamic-range int8 LiteRT beside them (timings, file size, differences), for comparison;
  6. LiteRT's batch handling: batches of 2 and 3 with the interpreter resized before each call
     (a dynamic batch dimension) against each size run steadily, and a batch of 2 padded to 8
     (fixed buckets); the mixed sizes a micro-batcher hands over at concurrency 8, one resized
     interpreter against power-of-two buckets; one interpreter behind a lock against one per
     thread, 4 threads calling.

    python benchmarks/engines.py [--model models/default/model.h5] [--threads 2]
        [--out benchmarks/results/engines.json]

The model is loaded in Keras' safe mode; metrics.json beside it gives the input contract, the
views and the OOD layers (its calibration's), else the defaults.
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

from devtools.machine import cpu_model
from devtools.measure import p50_ms, smaps_rollup_mb

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from predictor import ModelSpec, scale_pixels, tta_views  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "default" / "model.h5"


def cpu_name() -> str:
    """The CPU's model name and the vector extensions the engines can use, from /proc/cpuinfo."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    extensions = [flag for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    return f"{cpu_model()} ({', '.join(extensions) or 'no AVX'})"


def memory_mb() -> dict:
    """This process's memory, MB: PSS (shared pages divided among the processes mapping them),
    RSS, and USS (its private pages only)."""
    fields = smaps_rollup_mb()
    return {
        "pss_mb": fields["Pss"],
        "rss_mb": fields["Rss"],
        "uss_mb": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def describe(model_path: Path, model) -> tuple[ModelSpec, tuple[str, ...], str | None]:
    """The model's spec, OOD layers and explain layer, from metrics.json beside it when there is one."""
    from inference.ood import default_layers

    metrics_path = model_path.with_name("metrics.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    spec = ModelSpec(
        class_names=tuple(metrics.get("class_names", range(model.output_shape[-1]))),
        input_shape=tuple(metrics.get("input_shape", model.input_shape[1:])),
        input_scale=metrics.get("input_scale", "unit"),
        output_kind=metrics.get("output_kind", "logits"),
        tta=metrics.get("tta", "none"),
    )
    layers = ((metrics.get("calibration") or {}).get("ood") or {}).get("layers") or default_layers(model)
    return spec, tuple(layers), metrics.get("explain_layer")


def scaled(spec: ModelSpec, count: int, seed: int = 0) -> np.ndarray:
    """`count` random images scaled to the model's input range."""
    images = np.random.default_rng(seed).integers(0, 256, (count, *spec.input_shape), dtype=np.uint8)
    return scale_pixels(images, spec.input_scale)


def views_of(spec: ModelSpec, count: int, seed: int = 0) -> np.ndarray:
    """`count` random images as the model receives them: scaled, with their test-time views."""
    return tta_views(scaled(spec, count, seed), spec.tta)[0]


def calls_per_s(calls, per_thread: int) -> float:
    """Calls/s with one thread per callable in `calls`, each calling it `per_thread` times."""
    threads = [threading.Thread(target=lambda c=c: [c() for _ in range(per_thread)]) for c in calls]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(calls) * per_thread / (time.perf_counter() - started)


def ratio(figures: dict, engine: str = "litert") -> float:
    """An engine's figure over TensorFlow's, medians of the alternated rounds."""
    return statistics.median(figures[engine]) / statistics.median(figures["tensorflow"])


def grad_cam_difference(model, spec: ModelSpec, explain_layer: str | None, engine) -> float | None:
    """The largest difference between inference/explain.py's TensorFlow maps and the engine's (None when
    the engine has no explanation for this model)."""
    from inference.explain import Explainer

    if not engine.explainable:
        return None
    images = np.random.default_rng(4).integers(0, 256, (16, *spec.input_shape), dtype=np.uint8)
    classes = np.arange(16) % len(spec.class_names)
    want = Explainer(model, spec, explain_layer).explain(images, classes)
    return float(np.abs(engine.explain(scale_pixels(images, spec.input_scale), classes) - want).max())


# --- Children: a fresh process that loads one engine and answers one image --------------------


def child(kind: str, directory: Path) -> None:
    """Load one engine as a worker would, answer one image with its views, print PSS and timings."""
    started = time.perf_counter()
    config = json.loads((directory / "config.json").read_text())
    spec = ModelSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in config["spec"].items()})
    batch = views_of(spec, 1)
    if kind == "lite":
        from inference.lite_engine import LiteEngine

        metadata = json.loads((directory / "model.json").read_text())
        engine = LiteEngine((directory / "model.tflite").read_bytes(), metadata, config["threads"])
        answer = engine.outputs(batch)[0]
    else:
        import keras

        from predictor import Predictor

        model = keras.saving.load_model(config["model"], compile=False, safe_mode=True)
        answer = np.asarray(Predictor(model, spec, feature_layers=config["layers"])._forward(batch)[0])
    answered = time.perf_counter() - started
    print(
        json.dumps(
            {
                "in_process_s": answered,
                **memory_mb(),
                "logits_finite": bool(np.isfinite(answer).all()),
                "tensorflow_imported": "tensorflow" in sys.modules,
            }
        )
    )


def fresh_process(kind: str, directory: Path) -> dict:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--dir", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    figures["start_to_first_answer_s"] = time.perf_counter() - started
    return figures


# --- The run ----------------------------------------------------------------------------------


def mixed_sizes(converted, spec: ModelSpec, threads: int, calls: int = 400) -> dict:
    """The batch sizes a micro-batcher hands the engine at concurrency 8 (1 to 8 images, with
    their views), in a seeded random order: ms per call, one interpreter resized whenever the size
    changes against fixed power-of-two buckets (each with its own interpreter, never resized:
    the batch is padded with blank images and the padding's rows dropped)."""
    from inference import lite_engine

    views = len(views_of(spec, 1))
    sizes = np.random.default_rng(7).integers(1, 9, calls) * views
    batches = {int(size): scaled(spec, int(size), seed=int(size)) for size in set(sizes)}
    resized = lite_engine.LiteEngine(converted.tflite, converted.metadata, threads)
    bucket_of = {size: 1 << (size - 1).bit_length() for size in batches}
    buckets = {
        bucket: lite_engine.LiteEngine(converted.tflite, converted.metadata, threads)
        for bucket in set(bucket_of.values())
    }

    def padded(batch: np.ndarray) -> list[np.ndarray]:
        bucket = bucket_of[len(batch)]
        blank = np.zeros((bucket - len(batch), *batch.shape[1:]), np.float32)
        return [output[: len(batch)] for output in buckets[bucket].outputs(np.concatenate([batch, blank]))]

    figures = {}
    for name, call in (("resized", resized.outputs), ("buckets", padded)) * 2:  # alternated
        for size in sizes[:20]:  # every interpreter planned once before timing
            call(batches[size])
        started = time.perf_counter()
        for size in sizes:
            call(batches[size])
        figures.setdefault(f"mixed_sizes_{name}_ms_per_call", []).append(
            round(1000 * (time.perf_counter() - started) / calls, 3)
        )
    figures["mixed_sizes_bucket_interpreters"] = sorted(buckets)
    return figures


def measure(args) -> dict:
    import keras

    from inference import lite_engine
    from predictor import Predictor

    model = keras.saving.load_model(args.model, compile=False, safe_mode=True)
    spec, layers, explain_layer = describe(Path(args.model), model)
    started = time.perf_counter()
    converted = lite_engine.convert(model, layers, explain_layer)
    conversion_s = time.perf_counter() - started
    engine = lite_engine.LiteEngine(converted.tflite, converted.metadata, args.threads)
    tf_infer = Predictor(model, spec, feature_layers=layers)._forward

    def tf_call(batch):
        return [np.asarray(o) for o in tf_infer(batch)]

    # Dynamic-range int8 (`flask models import --engine int8`), checked as an import checks it;
    # serving it needs calibration and OOD statistics refitted on it.
    int8 = lite_engine.convert(model, layers, explain_layer, quantize=True)
    engines = {
        "tensorflow": tf_call,
        "litert": engine.outputs,
        "litert_int8": lite_engine.LiteEngine(int8.tflite, int8.metadata, args.threads).outputs,
    }
    one, big = views_of(spec, 1, seed=1), views_of(spec, 64, seed=2)
    single, throughput = {name: [] for name in engines}, {name: [] for name in engines}
    for _ in range(2):  # alternated, so a change in the machine's load hits all
        for name, call in engines.items():
            single[name].append(p50_ms(lambda call=call: call(one), args.repeats))
            throughput[name].append(64 / (p50_ms(lambda call=call: call(big), 3) / 1000))

    check = views_of(spec, 256, seed=3)
    lite_answers, tf_answers = engine.run(check), tf_call(check)
    lite_outputs = [lite_answers.logits, *lite_answers.features]
    differences = [float(np.abs(a - b).max()) for a, b in zip(lite_outputs, tf_answers, strict=True)]
    same_class = float((lite_answers.logits.argmax(1) == tf_answers[0].argmax(1)).mean())
    int8_logits = engines["litert_int8"](check)[0]
    int8_figures = {
        "tflite_bytes": len(int8.tflite),
        "max_abs_logit_diff_256_random_images": float(np.abs(int8_logits - tf_answers[0]).max()),
        "same_top_class_256_random_images": float((int8_logits.argmax(1) == tf_answers[0].argmax(1)).mean()),
        "one_image_ratio_to_tensorflow": ratio(single, "litert_int8"),
        "batch64_ratio_to_tensorflow": ratio(throughput, "litert_int8"),
    }
    maps_difference = grad_cam_difference(model, spec, explain_layer, engine)

    two, three, eight = scaled(spec, 2), scaled(spec, 3), scaled(spec, 8)
    steady = p50_ms(lambda: engine.outputs(two), args.repeats) + p50_ms(lambda: engine.outputs(three), args.repeats)
    batches = {
        "batch_2_then_batch_3_steady_ms": steady,
        "batch_2_then_batch_3_resized_each_call_ms": p50_ms(
            lambda: (engine.outputs(two), engine.outputs(three)), args.repeats
        ),
        "batch_2_padded_to_bucket_8_ms": p50_ms(lambda: engine.outputs(eight), args.repeats),
    }
    batches |= mixed_sizes(converted, spec, args.threads)
    per_thread = [lite_engine.LiteEngine(converted.tflite, converted.metadata, 1) for _ in range(4)]
    threading_figures = {
        "one_interpreter_locked_calls_per_s": calls_per_s([lambda: engine.outputs(one)] * 4, args.repeats),
        "interpreter_per_thread_calls_per_s": calls_per_s(
            [lambda e=e: e.outputs(one) for e in per_thread], args.repeats
        ),
    }

    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        (folder / "model.tflite").write_bytes(converted.tflite)
        (folder / "model.json").write_text(json.dumps(converted.metadata))
        config = {"spec": spec.__dict__, "threads": args.threads, "model": str(args.model), "layers": list(layers)}
        (folder / "config.json").write_text(json.dumps(config))
        processes = {"tensorflow": fresh_process("tf", folder), "litert": fresh_process("lite", folder)}

    return {
        "command": "python benchmarks/engines.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "model": str(args.model),
        "tta": spec.tta,
        "views_per_image": len(one),
        "ood_layers": list(layers),
        "explainable": engine.explainable,
        "threads": args.threads,
        "conversion_s": conversion_s,
        "tflite_bytes": len(converted.tflite),
        "probe_max_abs_diff": converted.metadata["probe_max_abs_diff"],
        "one_image_with_views_p50_ms": single,
        "one_image_ratio_litert_to_tensorflow": ratio(single),
        "batch64_images_per_s": throughput,
        "batch64_ratio_litert_to_tensorflow": ratio(throughput),
        "max_abs_diff_per_output_256_random_images": differences,
        "same_top_class_256_random_images": same_class,
        "grad_cam_max_abs_diff_16_random_images": maps_difference,
        "litert_int8": int8_figures,
        "litert_batches": batches,
        "litert_threads": threading_figures,
        "fresh_process": processes,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2, help="LiteRT's XNNPACK threads")
    parser.add_argument("--repeats", type=int, default=100, help="calls per timed p50")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engines.json")
    parser.add_argument("--child", choices=("lite", "tf"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.dir)
        return 0
    figures = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
