"""Data sets for training: CIFAR-10 or image folders, decoded with the serving preprocessing.

`ImageSplits` is this project's container (uint8 images and integer labels, split three ways);
the stratified split carves a held-out part of the training images that is never trained on.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from predictor import ImageError, decode_image
from registry.model_spec import CIFAR10_CLASSES

DEFAULT_ARCHIVE = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ImageSplits:
    """Images as uint8 N x H x W x 3 arrays with integer labels: train, held-out and test."""

    class_names: tuple[str, ...]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    sha256: str


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


def _iter_folder_files(source: Path) -> Iterator[tuple[str, str, bytes]]:
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


def file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's relative names and contents in sorted order."""
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


def _keras_cifar10() -> dict | None:
    """CIFAR-10 from Keras' cache, or None where it is not downloaded (it cannot be, here)."""
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / "cifar-10-batches-py"
    if not cache.is_dir():
        return None
    import keras

    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    return {"train": (x_train, y_train.ravel()), "test": (x_test, y_test.ravel())}


def stratified_split(labels: np.ndarray, held_out: float, random_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out): the given fraction of each class is held out, chosen with a seed."""
    rng = np.random.default_rng(random_seed)
    kept, out = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        rng.shuffle(members)
        cut = round(len(members) * held_out)
        out.append(members[:cut])
        kept.append(members[cut:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(out))


def load_splits(data: str | None, image_size: int, held_out: float, random_seed: int) -> ImageSplits:
    """Load CIFAR-10 or an image-folder data set, and hold out a stratified part of train."""
    splits = _keras_cifar10() if data is None else None
    if splits is not None:
        class_names, source, sha = CIFAR10_CLASSES, "keras.datasets.cifar10", "keras-cifar10"
    else:
        path = Path(data) if data else DEFAULT_ARCHIVE
        if not path.exists():
            raise SystemExit(f"error: data set not found: {path}")
        class_names, splits = read_image_folder(path, image_size)
        source, sha = str(path), file_sha256(path)
    return split_arrays(class_names, splits, held_out, random_seed, source, sha)


def split_arrays(
    class_names: tuple[str, ...], splits: dict, held_out: float, random_seed: int, source: str, sha: str
) -> ImageSplits:
    """ImageSplits from decoded train and test arrays, holding out a stratified part of train."""
    x_all, y_all = splits["train"]
    train_idx, val_idx = stratified_split(y_all, held_out, random_seed)
    x_test, y_test = splits["test"]
    if len(x_test) == 0:
        # No test folder: the held-out images stand in for it, and the report says so.
        x_test, y_test = x_all[val_idx], y_all[val_idx]
        source += " (no test split: held-out images used as test)"
    return ImageSplits(
        class_names, x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx], x_test, y_test, source, sha
    )
