"""Label queue benchmark: does a round ask about the model's mistakes, and does the feedback
check catch careless labels?

A pool like a busy history: clean CIFAR-10 test images, corrupted ones (Gaussian noise, blur),
exact duplicates of some clean ones, and images that are none of the classes built as
benchmarks/calibration_ood.py builds them (rendered text, noise, flat colours: the groups that
need no extra package). The shipped model, calibrated as its metrics.json records, scores every
image (calibrated probabilities, OOD score, penultimate features, through the app's Predictor);
the outputs are cached in benchmarks/results/label_queue_cache.npz.tmp (not committed).

Then labelling/queue.py builds a round of 250 (no shadow challenger here: its share goes to
margin) and the benchmark reports:

- the error rate of the round's first 200 items against the pool's base rate (an error: a
  CIFAR-10 image answered with the wrong class, or an image of none of the classes not called
  "unknown");
- diversity: duplicate hashes, the largest cosine between two items' features, the largest class share;
- the feedback check: every image of the pool labelled by an oracle (its class, or "none"), 10 %
  of the labels replaced by a random wrong class, then the check's precision and recall at
  finding those, for the flag alone (p(X) under class X's threshold) and for everything it holds.

    python benchmarks/label_queue.py --data ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from calibration_ood import cifar_test, noise, png, rendered_text  # noqa: E402

from devtools.machine import cpu_model  # noqa: E402
from labelling import queue  # noqa: E402
from training.data import DEFAULT_ARCHIVE  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "default" / "model.h5"
CACHE = ROOT / "benchmarks" / "results" / "label_queue_cache.npz.tmp"
NONE = "none"


def corrupted(jpegs: list[bytes], rng: np.random.Generator) -> tuple[list[bytes], list[str]]:
    """Half with Gaussian noise (sigma 20 to 50 of 255), half blurred (radius 1 to 2), as PNG."""
    out, kinds = [], []
    for i, data in enumerate(jpegs):
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if i % 2:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(1.0, 2.0))))
            kinds.append("blur")
        else:
            pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(20, 50), (32, 32, 3))
            image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            kinds.append("noise")
        out.append(png(np.asarray(image)))
    return out, kinds


def build_pool(archive: Path, clean: int, corrupt: int, duplicates: int, ood: int, seed: int) -> dict:
    """Encoded images with their truth (a class, or none) and group."""
    rng = np.random.default_rng(seed)
    files, labels = cifar_test(archive, clean + corrupt)
    broken, kinds = corrupted(files[clean:], rng)
    outside = [png(image) for image in rendered_text(ood // 3, rng) + noise(ood // 3, rng)]
    outside += [png(np.full((32, 32, 3), rng.integers(0, 256, 3), np.uint8)) for _ in range(ood - len(outside))]
    repeated = [int(i) for i in rng.choice(clean, duplicates, replace=False)]
    data = files[:clean] + broken + outside + [files[i] for i in repeated]
    truth = labels[:clean] + labels[clean:] + [NONE] * len(outside) + [labels[i] for i in repeated]
    groups = ["clean"] * clean + kinds + ["ood"] * len(outside) + ["duplicate"] * duplicates
    return {"data": data, "truth": np.array(truth), "group": np.array(groups)}


def score(model_path: Path, data: list[bytes], batch: int = 64) -> dict:
    """Calibrated probabilities, OOD scores and penultimate features of every image, from the
    shipped model as the app serves it (decoding, TTA, calibration)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from inference import ood
    from inference.calibration import Calibration
    from predictor import Predictor, decode_image
    from registry import metrics_schema
    from registry.model_formats import load_keras_model
    from registry.model_spec import ModelSpec

    metrics = metrics_schema.read_metrics(model_path.with_name("metrics.json"))
    spec = ModelSpec(
        tuple(metrics["class_names"]),
        tuple(metrics["input_shape"]),
        metrics["input_scale"],
        metrics["output_kind"],
        metrics["tta"],
    )
    model = load_keras_model(model_path, allow_hdf5=True)
    predictor = Predictor(model, spec, Calibration.from_record(metrics["calibration"]))
    # Images compared by the deepest block's channel means (the served model compares what its head reads).
    penultimate = Predictor(model, spec, feature_layers=(ood.block_ends(model)[-1],))
    pixels = np.stack([decode_image(item, spec.image_size) for item in data])
    probabilities, ood, features = [], [], []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start : start + batch]
        scores = predictor.score_arrays(chunk)
        probabilities.append(scores.probabilities)
        ood.append(scores.ood_scores)
        features.append(penultimate.infer(chunk)[1][0].astype(np.float32))
    threshold = predictor.calibration.ood.threshold
    return {
        "class_names": np.array(spec.class_names),
        "probabilities": np.concatenate(probabilities),
        "ood": np.concatenate(ood),
        "features": np.concatenate(features),
        "ood_threshold": np.array(threshold),
        "confidence_threshold": np.array(predictor.calibration.confidence_threshold),
    }


def cached_scores(args, data: list[bytes]) -> tuple[dict, float]:
    key = hashlib.sha256(b"".join(hashlib.sha256(item).digest() for item in data)).hexdigest()
    if CACHE.is_file():
        with np.load(CACHE) as cached:
            if str(cached["key"]) == key:
                return dict(cached), 0.0
    started = time.perf_counter()
    scores = score(args.model, data)
    seconds = time.perf_counter() - started
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with CACHE.open("wb") as handle:
        np.savez(handle, key=np.array(key), **scores)
    return scores, seconds


def decisions(scores: dict) -> np.ndarray:
    top = scores["probabilities"].max(axis=1)
    unknown = scores["ood"] > scores["ood_threshold"]
    unsure = top < scores["confidence_threshold"]
    return np.where(unknown, "unknown", np.where(unsure, "unsure", "confident"))


def errors(pool: dict, scores: dict, decided: np.ndarray) -> np.ndarray:
    """The answers a person would correct: a wrong class, or a class for what is none of them."""
    top = scores["class_names"][scores["probabilities"].argmax(axis=1)]
    outside = pool["truth"] == NONE
    return np.where(outside, decided != "unknown", top != pool["truth"])


def subset(pool: dict, scores: dict, decided: np.ndarray, mask: np.ndarray) -> tuple[dict, dict, np.ndarray]:
    """The pool, its scores and decisions restricted to the images of `mask`."""
    rows = np.flatnonzero(mask)
    kept_pool = {"data": [pool["data"][i] for i in rows], "truth": pool["truth"][rows], "group": pool["group"][rows]}
    per_image = ("probabilities", "ood", "features")
    kept_scores = {key: value[rows] if key in per_image else value for key, value in scores.items()}
    return kept_pool, kept_scores, decided[rows]


def round_figures(pool: dict, scores: dict, decided: np.ndarray, size: int, first: int, seed: int) -> dict:
    names = list(scores["class_names"])
    shas = [hashlib.sha256(item).hexdigest() for item in pool["data"]]
    candidates = [
        queue.Candidate(i, shas[i], names[int(p.argmax())], dict(zip(names, map(float, p), strict=True)), float(o))
        for i, (p, o) in enumerate(zip(scores["probabilities"], scores["ood"], strict=True))
    ]
    features = scores["features"]
    started = time.perf_counter()
    items = queue.build_round(candidates, size, lambda ids: features[ids], np.random.default_rng(seed))
    build_s = time.perf_counter() - started
    wrong = errors(pool, scores, decided)
    ids = np.array([item.prediction_id for item in items])
    unit = features[ids] / np.linalg.norm(features[ids], axis=1, keepdims=True)
    cosine = unit @ unit.T
    np.fill_diagonal(cosine, -1)
    sampled = np.array([item.lane == "random" for item in items])
    cosine[np.outer(sampled, sampled)] = -1  # two random draws may be alike: that lane is a uniform sample
    tops = [candidates[i].top_class for i in ids]
    lanes = {}
    for item in items:
        lanes.setdefault(item.lane, []).append(item.prediction_id)
    return {
        "items": len(items),
        "build_s": build_s,
        "base_error": float(wrong.mean()),
        "first_error": float(wrong[ids[:first]].mean()),
        "round_error": float(wrong[ids].mean()),
        "lanes": {lane: (len(members), float(wrong[members].mean())) for lane, members in lanes.items()},
        "duplicate_hashes": len(ids) - len({shas[i] for i in ids}),
        "max_cosine": float(cosine.max()),
        "max_class_share": max(tops.count(name) for name in set(tops)) / len(items),
        "groups": {g: int((pool["group"][ids] == g).sum()) for g in np.unique(pool["group"])},
    }


def check_figures(pool: dict, scores: dict, decided: np.ndarray, share: float, seed: int) -> dict:
    """Oracle labels for the whole pool, `share` of them replaced by a random wrong class; the
    check's precision and recall at finding the replaced ones."""
    rng = np.random.default_rng(seed)
    names = list(scores["class_names"])
    top = [names[int(p.argmax())] for p in scores["probabilities"]]
    truth = list(pool["truth"])
    given = list(truth)
    injected = rng.choice(len(given), int(share * len(given)), replace=False)
    for i in injected:
        given[i] = str(rng.choice([name for name in names if name != truth[i]]))
    labels = []
    for i, label in enumerate(given):
        verdict = NONE if label == NONE else "right" if label == top[i] else "wrong"
        probabilities = dict(zip(names, map(float, scores["probabilities"][i]), strict=True))
        labels.append(
            queue.Label(i, verdict, None if label == NONE else label, top[i], str(decided[i]), probabilities, (i,))
        )
    thresholds = queue.class_thresholds(labels)
    bad = np.zeros(len(labels), bool)
    bad[injected] = True
    flagged = np.array(
        [
            queue.doubt(label, thresholds) is not None and "under the" in queue.doubt(label, thresholds)
            for label in labels
        ]
    )
    held = np.array([queue.review(label, thresholds, [])[0] == queue.HELD for label in labels])
    return {
        "labels": len(labels),
        "injected": int(bad.sum()),
        "flag": _precision_recall(flagged, bad),
        "held": _precision_recall(held, bad),
        "thresholds": thresholds,
    }


def _precision_recall(found: np.ndarray, bad: np.ndarray) -> tuple[int, float, float]:
    hits = int((found & bad).sum())
    return int(found.sum()), hits / max(int(found.sum()), 1), hits / max(int(bad.sum()), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--clean", type=int, default=2000)
    parser.add_argument("--corrupt", type=int, default=1000)
    parser.add_argument("--duplicates", type=int, default=50)
    parser.add_argument("--ood", type=int, default=300)
    parser.add_argument("--size", type=int, default=queue.DEFAULT_ROUND_SIZE)
    parser.add_argument("--first", type=int, default=200)
    parser.add_argument("--wrong-share", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pool = build_pool(args.data, args.clean, args.corrupt, args.duplicates, args.ood, args.seed)
    scores, score_s = cached_scores(args, pool["data"])
    decided = decisions(scores)
    groups = ", ".join(f"{g} {int((pool['group'] == g).sum())}" for g in np.unique(pool["group"]))
    print(f"CPU: {cpu_model()}; pool {len(pool['data'])} images ({groups}); model {args.model}")
    print(f"scoring: {f'{score_s:.1f} s, 1 TensorFlow thread' if score_s else 'cached'}")
    pools = {"mixed pool": np.ones(len(pool["data"]), bool), "clean CIFAR-10 only": pool["group"] == "clean"}
    for name, mask in pools.items():
        part = subset(pool, scores, decided, mask)
        rounds = round_figures(*part, args.size, args.first, args.seed)
        check = check_figures(*part, args.wrong_share, args.seed)
        report(name, args, rounds, check)
    return 0


def report(name: str, args, rounds: dict, check: dict) -> None:
    base = rounds["base_error"]
    print(f"\n### {name}: round of {args.size} built in {rounds['build_s']:.2f} s\n")
    print("| items | error rate | x base |")
    print("| --- | ---: | ---: |")
    print(f"| pool (base rate) | {base:.3f} | 1.0 |")
    print(f"| first {args.first} items | {rounds['first_error']:.3f} | {rounds['first_error'] / base:.1f} |")
    print(f"| whole round ({rounds['items']}) | {rounds['round_error']:.3f} | {rounds['round_error'] / base:.1f} |")
    for lane, (count, rate) in rounds["lanes"].items():
        print(f"| lane {lane} ({count}) | {rate:.3f} | {rate / base:.1f} |")
    groups = ", ".join(f"{g} {n}" for g, n in rounds["groups"].items() if n)
    print(
        f"\ndiversity: {rounds['duplicate_hashes']} duplicate hashes, largest feature cosine (not two random) "
        f"{rounds['max_cosine']:.3f}, largest class share {rounds['max_class_share']:.1%}; the round holds {groups}\n"
    )
    print(f"feedback check: {check['labels']} oracle labels, {check['injected']} replaced by a random wrong class\n")
    print("| rule | held | precision | recall |")
    print("| --- | ---: | ---: | ---: |")
    rules = (("flag: p(X) under class X's threshold", "flag"), ("everything held (flag, or against confident)", "held"))
    for label, key in rules:
        count, precision, recall = check[key]
        print(f"| {label} | {count} | {precision:.3f} | {recall:.3f} |")
    print("\nthresholds: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(check["thresholds"].items())))


if __name__ == "__main__":
    sys.exit(main())
