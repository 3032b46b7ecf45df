"""The registry's first model file (before format 1 of model_files.py), read only to convert it.

It was a NumPy .npz archive of `config` (the Keras JSON as bytes) and `weight_0` ... `weight_N`
(`model.get_weights()` in order). Weights stored by position are what model_files.py replaces:
this reader is used only by the import sandbox, so that `flask models upgrade-files` and an
import of an old export re-save such a file in the current format; serving never reads it.
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


def is_npz_model_file(source: BinaryIO) -> bool:
    """Whether `source` is such an archive: a zip (from its first byte, as np.load sees it) of
    `config.npy` and `weight_<n>.npy` only, each once."""
    try:
        if source.read(4) != ZIP_MAGIC:
            return False
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    except Exception:  # zipfile raises several types on a crafted archive; all mean "not one"
        return False
    expected = {f"{CONFIG}.npy"} | {f"{WEIGHT_PREFIX}{index}.npy" for index in range(len(names) - 1)}
    return len(set(names)) == len(names) and set(names) == expected


def load_npz_model(path: Path):
    """Rebuild the model in safe mode and set its weights in stored order."""
    import keras

    with np.load(path, allow_pickle=False) as arrays:
        config = json.loads(arrays[CONFIG].tobytes())
        config.pop("compile_config", None)
        model = keras.saving.deserialize_keras_object(config, safe_mode=True)
        count = sum(1 for name in arrays.files if name.startswith(WEIGHT_PREFIX))
        model.set_weights([arrays[f"{WEIGHT_PREFIX}{index}"] for index in range(count)])
    return model
