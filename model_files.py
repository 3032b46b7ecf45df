"""The registry's model file: a Keras model without HDF5.

h5py's bundled HDF5 has heap overflows on crafted files, and Keras' own alternative to HDF5
weights (`model.weights.npz` in a .keras archive) stores them as pickled object arrays. So the
registry stores a model as one NumPy .npz archive of plain arrays: `config` (the Keras JSON
configuration, as bytes) and `weight_0` ... `weight_N` (`model.get_weights()` in order, batch
statistics included). It is read with `allow_pickle=False` and rebuilt in Keras' safe mode.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np

ZIP_MAGIC = b"PK\x03\x04"
CONFIG = "config"
WEIGHT_PREFIX = "weight_"


def save_model_file(model, destination: Path) -> None:
    """Write `model` as a registry model file; the same model always gives the same bytes."""
    arrays = {CONFIG: np.frombuffer(model.to_json().encode(), dtype=np.uint8)}
    arrays |= {f"{WEIGHT_PREFIX}{index}": array for index, array in enumerate(model.get_weights())}
    with zipfile.ZipFile(destination, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            # A bare ZipInfo has a fixed date, where np.savez stamps the current time.
            with archive.open(zipfile.ZipInfo(f"{name}.npy"), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)


def is_model_file(source: Path | BinaryIO) -> bool:
    """Whether `source` is a registry model file: a zip (from its first byte, as np.load sees it)
    of `config.npy` and `weight_<n>.npy` only, each once."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as handle:
                return _is_model_archive(handle)
        return _is_model_archive(source)
    except Exception:  # zipfile raises several types on a crafted archive; all mean "not ours"
        return False


def _is_model_archive(handle: BinaryIO) -> bool:
    if handle.read(4) != ZIP_MAGIC:
        return False
    with zipfile.ZipFile(handle) as archive:
        names = archive.namelist()
    expected = {f"{CONFIG}.npy"} | {f"{WEIGHT_PREFIX}{index}.npy" for index in range(len(names) - 1)}
    return len(set(names)) == len(names) and set(names) == expected


def load_model_file(path: Path):
    """Rebuild the model in safe mode (no Lambda layers, no custom classes) and set its weights."""
    import keras

    with np.load(path, allow_pickle=False) as arrays:
        config = json.loads(arrays[CONFIG].tobytes())
        config.pop("compile_config", None)  # served models are never compiled
        model = keras.saving.deserialize_keras_object(config, safe_mode=True)
        count = sum(1 for name in arrays.files if name.startswith(WEIGHT_PREFIX))
        model.set_weights([arrays[f"{WEIGHT_PREFIX}{index}"] for index in range(count)])
    return model
