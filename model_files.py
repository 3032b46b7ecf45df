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
    """Whether `source` is a registry model file (a zip of `config.npy` and `weight_<n>.npy` only)."""
    try:
        with zipfile.ZipFile(source) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    weights = names - {f"{CONFIG}.npy"}
    expected = {f"{WEIGHT_PREFIX}{index}.npy" for index in range(len(weights))}
    return f"{CONFIG}.npy" in names and weights == expected


def load_model_file(path: Path):
    """Rebuild the model in safe mode (no Lambda layers, no custom classes) and set its weights."""
    import keras

    with np.load(path, allow_pickle=False) as arrays:
        config = json.loads(arrays[CONFIG].tobytes())
        model = keras.saving.deserialize_keras_object(config, safe_mode=True)
        model.set_weights([arrays[f"{WEIGHT_PREFIX}{index}"] for index in range(len(arrays.files) - 1)])
    return model
