"""Train and evaluate the CIFAR-10 classifier (or one on your own image folders).

    python train.py [--arch strong|seed] [--data PATH] [--epochs N] [--out DIR] [--import]
    python train.py evaluate MODEL [--data PATH] [--out DIR]

Data: `keras.datasets.cifar10` when it is cached on this machine, else an image-folder archive
or folder (`train/<class>/*`, and `test/<class>/*` or a validation fraction). Hyper-parameters are
chosen on a validation split carved from the training images; the test split is used once, for
the reported figure. Writes the model (.h5, no optimizer state), a metrics JSON and a report
(JSON, training curves and confusion matrix as PNG).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

import reports
from model_store import CIFAR10_CLASSES
from predictor import ImageError, ModelSpec, Predictor, decode_image

DEFAULT_ARCHIVE = Path(__file__).resolve().parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Defaults per architecture; the strong defaults reproduce the shipped model.
ARCH_DEFAULTS = {
    "strong": {
        "epochs": 24,
        "batch_size": 512,
        "learning_rate": 0.8,
        "weight_decay": 5e-3,
        "precision": "mixed_bfloat16",
    },
    "seed": {"epochs": 50, "batch_size": 32, "learning_rate": 0.001, "weight_decay": 0.0, "precision": "float32"},
}
STRONG_WIDTHS = (64, 256, 256)


@dataclass
class Dataset:
    """Images as uint8 N x H x W x 3 arrays with integer labels, split three ways."""

    class_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    sha256: str


# ---------------------------------------------------------------- data


def _split_label(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(split, class) from a path inside an image-folder data set, or None.

    `train/<class>/file` and `test/<class>/file` name their split; a plain `<class>/file` (as
    `flask export-feedback` writes) counts as training data.
    """
    if len(parts) >= 3 and parts[-3] in ("train", "test"):
        return parts[-3], parts[-2]
    if len(parts) == 2:
        return "train", parts[0]
    return None


def _iter_folder_files(source: Path):
    """Yield (split, class, bytes) for each image file of an archive or folder."""
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            key = _split_label(path.relative_to(source).parts)
            if key and path.suffix.lower() in IMAGE_SUFFIXES:
                yield *key, path.read_bytes()
        return
    with tarfile.open(source) as archive:
        for member in archive:
            key = _split_label(tuple(Path(member.name).parts))
            if member.isfile() and key and member.name.lower().endswith(IMAGE_SUFFIXES):
                yield *key, archive.extractfile(member).read()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
        return digest.hexdigest()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_image_folder(source: Path, image_size: int) -> tuple[tuple[str, ...], dict[str, tuple]]:
    """Decode an image-folder data set with the serving preprocessing; returns classes and splits."""
    samples: dict[str, list] = {"train": [], "test": []}
    for split, label, data in _iter_folder_files(source):
        try:
            samples[split].append((label, decode_image(data, (image_size, image_size))))
        except ImageError as exc:
            print(f"skipping an unreadable image in {split}/{label}: {exc.message}", file=sys.stderr)
    class_names = tuple(sorted({label for label, _ in samples["train"]}))
    if not class_names:
        raise SystemExit(f"error: no images under train/<class>/ in {source}")
    if set(CIFAR10_CLASSES) == set(class_names):
        class_names = CIFAR10_CLASSES  # keep the canonical label order
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, items in samples.items():
        items = [(label, image) for label, image in items if label in index]
        images = (
            np.stack([image for _, image in items]) if items else np.zeros((0, image_size, image_size, 3), np.uint8)
        )
        splits[split] = (images, np.array([index[label] for label, _ in items], np.int64))
    return class_names, splits


def _keras_cifar10():
    """CIFAR-10 from Keras' cache, or None where it is not downloaded (it cannot be, here)."""
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / "cifar-10-batches-py"
    if not cache.is_dir():
        return None
    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    return {"train": (x_train, y_train.ravel()), "test": (x_test, y_test.ravel())}


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation): the given fraction of each class, chosen with a seed."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        cut = round(len(members) * fraction)
        val_idx.append(members[:cut])
        train_idx.append(members[cut:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def load_dataset(data: str | None, image_size: int, val_fraction: float, seed: int) -> Dataset:
    """Load CIFAR-10 or an image-folder data set, and carve a validation split from train."""
    splits = _keras_cifar10() if data is None else None
    if splits is not None:
        class_names, source, sha = CIFAR10_CLASSES, "keras.datasets.cifar10", "keras-cifar10"
    else:
        path = Path(data) if data else DEFAULT_ARCHIVE
        if not path.exists():
            raise SystemExit(f"error: data set not found: {path}")
        class_names, splits = read_image_folder(path, image_size)
        source, sha = str(path), _file_sha256(path)
    x_all, y_all = splits["train"]
    train_idx, val_idx = stratified_split(y_all, val_fraction, seed)
    x_test, y_test = splits["test"]
    if len(x_test) == 0:
        # No test folder: the validation split stands in for it, and the report says so.
        x_test, y_test = x_all[val_idx], y_all[val_idx]
        source += " (no test split: validation images used as test)"
    return Dataset(
        class_names,
        x_all[train_idx],
        y_all[train_idx],
        x_all[val_idx],
        y_all[val_idx],
        x_test,
        y_test,
        source,
        sha,
    )


# ---------------------------------------------------------------- models


def build_seed_model(input_shape: tuple[int, int, int], num_classes: int):
    """The seed document's CNN: three convolutions, a dense layer, logits out."""
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=input_shape),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(num_classes),
        ],
        name="seed_cnn",
    )


def whitening_weights(images: np.ndarray, eps: float = 5e-4) -> tuple[np.ndarray, np.ndarray]:
    """Kernel and bias of a 2x2 convolution that whitens image patches (as in airbench).

    The filters are the eigenvectors of the patch covariance scaled by 1/sqrt(eigenvalue), and
    their negatives; the bias centres the patches, so the layer also normalises the input.
    """
    sample = images[:2000].astype(np.float32) / 255.0
    windows = np.lib.stride_tricks.sliding_window_view(sample, (2, 2), axis=(1, 2))
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 12).astype(np.float64)
    mean = patches.mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    filters = eigenvectors.T / np.sqrt(eigenvalues + eps)[:, None]
    filters = np.concatenate([filters, -filters])  # 24 x 12
    kernel = filters.reshape(24, 2, 2, 3).transpose(1, 2, 3, 0)
    bias = -filters @ mean
    return kernel.astype(np.float32), bias.astype(np.float32)


def build_strong_model(
    input_shape: tuple[int, int, int], num_classes: int, whitening=None, widths: tuple[int, ...] = STRONG_WIDTHS
):
    """An airbench94-style net: frozen patch-whitening layer, three conv groups with batch norm."""
    from keras import layers

    def conv_group(x, width: int, index: int):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{index}a")(x)
        x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
        x = layers.BatchNormalization(scale=False, momentum=0.4, epsilon=1e-5, name=f"bn{index}a")(x)
        x = layers.Activation("gelu", name=f"gelu{index}a")(x)
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{index}b")(x)
        x = layers.BatchNormalization(scale=False, momentum=0.4, epsilon=1e-5, name=f"bn{index}b")(x)
        return layers.Activation("gelu", name=f"gelu{index}b")(x)

    inputs = keras.Input(shape=input_shape)
    whiten = layers.Conv2D(24, 2, padding="valid", trainable=False, name="whiten")
    x = layers.Activation("gelu", name="gelu0")(whiten(inputs))
    for index, width in enumerate(widths, start=1):
        x = conv_group(x, width, index)
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Dense(num_classes, use_bias=False, dtype="float32", name="logits")(x)
    outputs = layers.Rescaling(1 / 9, dtype="float32", name="temperature")(x)
    model = keras.Model(inputs, outputs, name="strong_cnn")
    if whitening is not None:
        whiten.set_weights(list(whitening))
    return model


def build_model(arch: str, input_shape, num_classes: int, train_images=None, widths=STRONG_WIDTHS):
    """Build an architecture by name; the strong one needs training images for its whitening."""
    if arch == "seed":
        return build_seed_model(input_shape, num_classes)
    whitening = whitening_weights(train_images) if train_images is not None else None
    return build_strong_model(input_shape, num_classes, whitening, tuple(widths))


# ---------------------------------------------------------------- input pipeline


def make_dataset(
    images,
    labels,
    num_classes,
    batch_size,
    *,
    training,
    augment,
    seed,
    one_hot,
    padding=4,
    cutout=0,
    whole_batches=False,
):
    """A tf.data pipeline: uint8 images to [0, 1] floats; random crop and flip when augmenting.

    Labels are one-hot for the strong recipe (label smoothing needs them), integers for the seed's
    sparse cross-entropy.
    """
    import tensorflow as tf  # here, not at the top: the model code itself is backend-neutral Keras

    height, width = images.shape[1:3]

    def prepare(image, label):
        image = tf.cast(image, tf.float32) / 255.0
        if augment:
            padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
            image = tf.image.random_crop(padded, [height, width, 3])
            image = tf.image.random_flip_left_right(image)
            if cutout:
                image = cut_out(image, cutout)
        return image, (tf.one_hot(label, num_classes) if one_hot else label)

    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size, drop_remainder=training or whole_batches).prefetch(tf.data.AUTOTUNE)


def cut_out(image, size: int):
    """Grey out a random size x size square (clipped at the border), as in DeVries & Taylor's Cutout."""
    import tensorflow as tf

    height, width = tf.shape(image)[0], tf.shape(image)[1]
    centre_y = tf.random.uniform([], 0, height, tf.int32)
    centre_x = tf.random.uniform([], 0, width, tf.int32)
    rows = tf.range(height)[:, None]
    cols = tf.range(width)[None, :]
    inside = (tf.abs(rows - centre_y) * 2 < size) & (tf.abs(cols - centre_x) * 2 < size)
    return tf.where(inside[:, :, None], tf.constant(0.5, image.dtype), image)


def make_strategy(name: str, logical_cpus: int):
    """The tf.distribute strategy for a flag value; the batch size given to it is global."""
    import tensorflow as tf

    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


# ---------------------------------------------------------------- training


class RemainingTime(keras.callbacks.Callback):
    """Prints elapsed and estimated remaining time after each epoch (Keras' bar covers one epoch)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.start = time.monotonic()

    def on_train_begin(self, logs=None):
        self.start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.monotonic() - self.start
        remaining = elapsed / (epoch + 1) * (self.epochs - epoch - 1)
        val = (logs or {}).get("val_accuracy")
        val_text = f", val_accuracy {val:.4f}" if val is not None else ""
        print(
            f"epoch {epoch + 1}/{self.epochs}: elapsed {elapsed / 60:.1f} min, "
            f"about {remaining / 60:.1f} min left{val_text}",
            flush=True,
        )


def compile_model(model, arch: str, settings: dict, steps_per_epoch: int):
    """Attach the architecture's optimizer, loss and schedule."""
    if arch == "seed":
        model.compile(
            optimizer=keras.optimizers.Adam(settings["learning_rate"]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        return
    total_steps = steps_per_epoch * settings["epochs"]
    warmup_steps = max(1, int(0.2 * total_steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=settings["learning_rate"] * 0.1,
        decay_steps=total_steps - warmup_steps,
        warmup_target=settings["learning_rate"],
        warmup_steps=warmup_steps,
    )
    optimizer = keras.optimizers.SGD(
        schedule,
        momentum=0.9,
        nesterov=True,
        weight_decay=settings["weight_decay"],
        use_ema=settings.get("ema", 0) > 0,
        ema_momentum=settings.get("ema", 0) or 0.99,
    )
    optimizer.exclude_from_weight_decay(var_names=["beta", "bias"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2),
        metrics=["accuracy"],
    )


def to_float32(model, arch: str, dataset: Dataset):
    """A float32 copy of a model trained under mixed precision, for saving and serving."""
    policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    try:
        clone = build_model(arch, model.input_shape[1:], len(dataset.class_names))
        clone.set_weights(model.get_weights())
    finally:
        keras.mixed_precision.set_global_policy(policy)
    return clone


def measure_inference(predictor: Predictor, batch: int = 64, repeats: int = 20) -> dict:
    """Images/s in a batch and ms for one image, through the serving code path."""
    height, width, _ = predictor.spec.input_shape
    images = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    predictor.predict_arrays(images)
    predictor.predict_arrays(images[:1])
    start = time.perf_counter()
    for _ in range(repeats):
        predictor.predict_arrays(images)
    batch_rate = batch * repeats / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(repeats):
        predictor.predict_arrays(images[:1])
    single_ms = (time.perf_counter() - start) / repeats * 1000
    return {"images_per_s_batch64": round(batch_rate, 1), "ms_one_image": round(single_ms, 2)}


def evaluate_predictor(predictor: Predictor, images: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class, columns: predicted)."""
    names = predictor.spec.class_names
    predicted = (
        np.concatenate(
            [predictor.predict_arrays(images[i : i + 500]).argmax(axis=1) for i in range(0, len(images), 500)]
        )
        if len(images)
        else np.zeros(0, np.int64)
    )
    confusion = np.zeros((len(names), len(names)), np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    totals = confusion.sum(axis=1)
    per_class = {name: (float(confusion[i, i] / totals[i]) if totals[i] else None) for i, name in enumerate(names)}
    return {
        "accuracy": float(np.trace(confusion) / max(1, len(labels))),
        "images": len(labels),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }


def print_evaluation(evaluation: dict, class_names) -> None:
    """Overall and per-class accuracy and the confusion matrix, as text."""
    print(f"accuracy: {evaluation['accuracy'] * 100:.2f} % on {evaluation['images']} images")
    for name, accuracy in evaluation["per_class_accuracy"].items():
        print(f"  {name:>12}: {'-' if accuracy is None else f'{accuracy * 100:.1f} %'}")
    width = max(6, *(len(n) for n in class_names))
    print("confusion matrix (rows: true, columns: predicted)")
    print(" " * width + "".join(f"{n[:6]:>7}" for n in class_names))
    for name, row in zip(class_names, evaluation["confusion_matrix"], strict=True):
        print(f"{name:>{width}}" + "".join(f"{v:>7}" for v in row))


def write_report(out_dir: Path, evaluation: dict, class_names, history: dict | None) -> dict[str, str]:
    """Write report.json and PNG plots (curves when a history is given; confusion matrix)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"report": "report.json", "confusion_plot": "confusion.png"}
    (out_dir / "report.json").write_text(json.dumps({"test": evaluation, "history": history}, indent=2))
    matrix_png = reports.confusion_png(evaluation["confusion_matrix"], list(class_names), evaluation["accuracy"])
    (out_dir / "confusion.png").write_bytes(matrix_png)
    if history:
        files["curves_plot"] = "curves.png"
        (out_dir / "curves.png").write_bytes(reports.curves_png(history))
    return files


def _print_summary(metrics: dict) -> None:
    test = metrics["test_accuracy"] * 100
    print(
        f"summary: arch={metrics['arch']} test_accuracy={test:.2f}% "
        f"best_val_accuracy={metrics['best_val_accuracy'] * 100:.2f}% epochs={metrics['epochs']} "
        f"wall={metrics['wall_time_s'] / 60:.1f}min params={metrics['parameters']:,} "
        f"infer={metrics['inference']['images_per_s_batch64']:.0f}img/s(b64) "
        f"{metrics['inference']['ms_one_image']:.1f}ms(1img)"
    )


def train(args) -> dict:
    """Train, save the model, its metrics and report; returns the metrics."""
    previous_policy = keras.mixed_precision.global_policy()
    try:
        return _train(args)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train(args) -> dict:
    started = time.monotonic()
    keras.utils.set_random_seed(args.seed)
    strategy = make_strategy(args.distribute, args.logical_cpus)
    if args.precision != "float32":
        keras.mixed_precision.set_global_policy(args.precision)
    dataset = load_dataset(args.data, args.image_size, args.val_fraction, args.seed)
    num_classes = len(dataset.class_names)
    input_shape = dataset.x_train.shape[1:]
    print(
        f"data: {dataset.source}: {len(dataset.x_train)} train, {len(dataset.x_val)} validation, "
        f"{len(dataset.x_test)} test images, {num_classes} classes; {strategy.num_replicas_in_sync} replica(s)"
    )
    settings = {key: getattr(args, key) for key in ARCH_DEFAULTS[args.arch]} | {"ema": args.ema}
    augment = args.arch == "strong"
    train_data = make_dataset(
        dataset.x_train,
        dataset.y_train,
        num_classes,
        args.batch_size,
        training=True,
        augment=augment,
        seed=args.seed,
        one_hot=augment,
        cutout=args.cutout,
    )
    replicas = strategy.num_replicas_in_sync
    # Keras fails on a validation batch that splits unevenly over replicas; with several replicas
    # the batch is a multiple of their number and up to replicas - 1 images are left out.
    val_batch = max(replicas, min(1000, len(dataset.x_val)) // replicas * replicas)
    val_data = make_dataset(
        dataset.x_val,
        dataset.y_val,
        num_classes,
        val_batch,
        training=False,
        augment=False,
        seed=0,
        one_hot=augment,
        whole_batches=replicas > 1,
    )
    steps = len(dataset.x_train) // args.batch_size
    with strategy.scope():
        model = build_model(args.arch, input_shape, num_classes, dataset.x_train)
        compile_model(model, args.arch, settings, steps)
    history = model.fit(
        train_data,
        epochs=args.epochs,
        validation_data=val_data if len(dataset.x_val) else None,
        verbose=args.verbose,
        callbacks=[RemainingTime(args.epochs)],
    )
    train_seconds = time.monotonic() - started
    model = to_float32(model, args.arch, dataset)
    spec = ModelSpec(dataset.class_names, tuple(input_shape), "unit", "logits", "flip" if augment else "none")
    predictor = Predictor(model, spec)
    evaluation = evaluate_predictor(predictor, dataset.x_test, dataset.y_test)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "model.h5"
    model.save(model_path, include_optimizer=False)
    history_dict = {key: [float(v) for v in values] for key, values in history.history.items()}
    val_curve = history_dict.get("val_accuracy", [0.0])
    metrics = {
        "arch": args.arch,
        "class_names": list(dataset.class_names),
        "input_shape": list(input_shape),
        "input_scale": spec.input_scale,
        "output_kind": spec.output_kind,
        "tta": spec.tta,
        "test_accuracy": evaluation["accuracy"],
        "per_class_accuracy": evaluation["per_class_accuracy"],
        "confusion_matrix": evaluation["confusion_matrix"],
        "best_val_accuracy": max(val_curve),
        "final_val_accuracy": val_curve[-1],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "weight_decay": args.weight_decay,
        "cutout": args.cutout,
        "ema": args.ema,
        "precision": args.precision,
        "seed": args.seed,
        "distribute": args.distribute,
        "replicas": strategy.num_replicas_in_sync,
        "train_images": len(dataset.x_train),
        "val_images": len(dataset.x_val),
        "test_images": len(dataset.x_test),
        "data_source": dataset.source,
        "data_sha256": dataset.sha256,
        "parameters": int(model.count_params()),
        "train_time_s": round(train_seconds, 1),
        "wall_time_s": round(time.monotonic() - started, 1),
        "inference": measure_inference(predictor),
        "cpu_count": os.cpu_count(),
        "command": "python train.py " + " ".join(sys.argv[1:]),
        "history": history_dict,
    }
    metrics["report_files"] = write_report(out_dir / "report", evaluation, dataset.class_names, history_dict)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print_evaluation(evaluation, dataset.class_names)
    _print_summary(metrics)
    print(f"saved {model_path} ({model_path.stat().st_size / 1e6:.1f} MB), {out_dir / 'metrics.json'}")
    if args.import_model:
        import_trained(model_path, metrics, args.name)
    return metrics


def import_trained(model_path: Path, metrics: dict, name: str) -> None:
    """Store a trained model in the app's registry with its metrics, and activate it."""
    import model_store
    from app import create_app

    app = create_app()
    with app.app_context():
        model_store.init_db()
        row = model_store.import_model(model_path, name=name, metrics=metrics, activate=True)
        print(f"imported as model {row.id} ({row.name} v{row.version}) and activated")


def read_spec(model_path: Path, model) -> ModelSpec:
    """The serving spec of a model file: its metrics.json beside it, else the seed's defaults."""
    sidecar = model_path.with_name("metrics.json")
    metrics = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    input_shape = tuple(int(v) for v in model.input_shape[1:])
    classes = tuple(metrics.get("class_names", CIFAR10_CLASSES))
    return ModelSpec(
        classes,
        input_shape,
        metrics.get("input_scale", "unit"),
        metrics.get("output_kind", "logits"),
        metrics.get("tta", "none"),
    )


def evaluate(args) -> dict:
    """Evaluate a saved model on a data set's test split; print and write the report."""
    model_path = Path(args.model)
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    spec = read_spec(model_path, model)
    dataset = load_dataset(args.data, spec.input_shape[0], 0.0, 0)
    if dataset.class_names != spec.class_names:
        raise SystemExit(f"error: the data's classes {dataset.class_names} differ from the model's {spec.class_names}")
    evaluation = evaluate_predictor(Predictor(model, spec), dataset.x_test, dataset.y_test)
    print_evaluation(evaluation, spec.class_names)
    out_dir = Path(args.out) if args.out else model_path.parent / "evaluation"
    write_report(out_dir, evaluation, spec.class_names, None)
    print(f"report written to {out_dir}")
    return evaluation


def parse_args(argv: list[str]):
    """Parse `train.py [train] ...` or `train.py evaluate MODEL ...`."""
    if argv and argv[0] == "evaluate":
        parser = argparse.ArgumentParser(prog="train.py evaluate", description="Evaluate a saved model.")
        parser.add_argument("model", help="model file (.h5 or .keras); metrics.json beside it gives classes and TTA")
        parser.add_argument("--data", help="archive or folder with test/<class>/* (default: CIFAR-10)")
        parser.add_argument("--out", help="report folder (default: evaluation/ beside the model)")
        args = parser.parse_args(argv[1:])
        args.command = "evaluate"
        return args
    if argv and argv[0] == "train":
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="train.py", description="Train a CIFAR-10 (or image-folder) classifier.")
    parser.add_argument("--arch", choices=sorted(ARCH_DEFAULTS), default="strong")
    parser.add_argument(
        "--data", help="image-folder archive or folder (default: Keras' CIFAR-10 cache, else ../shared/data)"
    )
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="global batch size, split across replicas")
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--cutout", type=int, default=0, help="strong arch: grey out a random NxN square (0: off)")
    parser.add_argument("--ema", type=float, default=0.0, help="keep an exponential moving average of the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="fraction of train images held out")
    parser.add_argument("--image-size", type=int, default=32, help="square input size for image folders")
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--distribute", choices=("none", "mirrored", "multiworker"), default="none")
    parser.add_argument("--logical-cpus", type=int, default=1, help="split the CPU into N logical devices")
    parser.add_argument("--out", default="instance/training/latest", help="folder for model.h5, metrics.json, report/")
    parser.add_argument("--import", dest="import_model", action="store_true", help="store and activate in the registry")
    parser.add_argument("--name", default="cifar10-cnn", help="registry name for --import")
    parser.add_argument("--verbose", type=int, default=1, help="Keras verbosity: 1 progress bar, 2 one line an epoch")
    args = parser.parse_args(argv)
    for key, value in ARCH_DEFAULTS[args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.command = "train"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command == "evaluate":
        evaluate(args)
    else:
        train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
