"""A model file's format and its safe load, for the registry (model_store.py) and the import
sandbox (model_sandbox.py) alike: both need them, and neither imports the other for them.
"""

from __future__ import annotations

import io
from pathlib import Path

from app_errors import AppError
from registry.legacy_model_files import is_npz_model_file, load_npz_model
from registry.model_files import is_model_file, load_model_file

FORMAT_MAGIC = {"h5": b"\x89HDF\r\n\x1a\n", "keras": b"PK\x03\x04"}
STORED_FORMAT = "safetensors"  # model_files.py: what the registry stores whatever was imported
LEGACY_FORMAT = "npz"  # legacy_model_files.py: the registry's first file, converted by upgrade_files


class ModelStoreError(AppError):
    """A registry operation that cannot be done; the message says why."""

    code = "registry"


def detect_format(data: bytes) -> str:
    """'safetensors' (a registry model file, as `flask models export` writes it), 'h5', 'keras',
    or 'npz' (the registry's first file format)."""
    if is_model_file(io.BytesIO(data)):
        return STORED_FORMAT
    for fmt, magic in FORMAT_MAGIC.items():
        if data.startswith(magic):
            return LEGACY_FORMAT if fmt == "keras" and is_npz_model_file(io.BytesIO(data)) else fmt
    raise ModelStoreError(
        "not a Keras model file: expected an HDF5 (.h5), a .keras (zip) or an exported .safetensors file"
    )


def load_keras_model(path: Path, allow_hdf5: bool = False):
    """Load a model file in Keras' safe mode: no Lambda layers, no arbitrary code. Anything but a
    registry model file (.h5, .keras, the old .npz) is refused unless `allow_hdf5` (the import
    sandbox, or a file of our own)."""
    import keras

    path = Path(path)
    stored = is_model_file(path)
    if not stored and not allow_hdf5:
        raise ModelStoreError(
            f"{path.name} is not a registry model file (.safetensors written by the import sandbox): "
            ".h5, .keras and .npz files are opened only in the sandbox"
        )
    try:
        if stored:
            return load_model_file(path)
        with path.open("rb") as handle:
            if is_npz_model_file(handle):
                return load_npz_model(path)
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file; all mean "refused".
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelStoreError(f"the file does not load as a safe Keras model: {reason[:300]}") from exc
