"""The registry's model file: one safetensors file, weights keyed by variable path.

h5py's bundled HDF5 has heap overflows on crafted files, and Keras' own weight formats are HDF5
or pickled arrays, so the registry stores its own file (docs/decisions/0001-registry-model-file.md):

- tensors `weights/<path>`, one per variable, batch statistics included: the variable's Keras 3
  `variable.path` from the model's top-level layer down (`conv2d/kernel`,
  `batch_normalization/moving_mean`). The scope above that layer (`sequential/` when the model
  was built in a script, none when Keras rebuilds it from its config) is left out: it depends on
  how the model was made, not on which weight it is;
- tensor `probe/logits`: the model's outputs on `probe_batch` (seeded uniform images at the
  input size), computed at import;
- header metadata (`__metadata__`, str -> str): `format`, `format_version`, `keras_config` (the
  model's Keras JSON) and `keras_version`.

Loading rebuilds the model from its config in Keras' safe mode, sets each variable by its path
(missing, extra or misshapen paths are refused) and checks the probe: a model that does not give
its recorded outputs is never served. Weights are set by name, so a Keras that orders same-shaped
variables differently (BatchNorm's four vectors) still loads the same model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

FORMAT = "imgcls-model"
FORMAT_VERSION = "1"
WEIGHT_PREFIX = "weights/"
PROBE_KEY = "probe/logits"
PROBE_SEED = 20261202
PROBE_IMAGES = 4
# float32 outputs of the same weights on the same CPU agree far closer; a reordered or damaged
# tensor moves them by orders of magnitude more.
PROBE_RTOL, PROBE_ATOL = 1e-4, 1e-5
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap


class ModelFileError(ValueError):
    """The file is not a loadable registry model file; the message says why."""


def probe_batch(input_shape: tuple[int, ...] | list[int]) -> np.ndarray:
    """The fixed probe images (batch, *input_shape), uniform in [0, 1), the same on every machine."""
    return np.random.default_rng(PROBE_SEED).random((PROBE_IMAGES, *input_shape), dtype=np.float32)


def model_outputs(model, images: np.ndarray) -> np.ndarray:
    return np.asarray(model(images, training=False), np.float32)


def variables_by_path(model) -> dict:
    """Every variable of `model` keyed by its path from its top-level layer; refuses repeats."""
    variables = {}
    for layer in model.layers:
        for variable in layer.weights:
            segments = variable.path.split("/")
            if layer.name in segments[:-1]:
                path = "/".join(segments[segments.index(layer.name) :])
            else:  # a variable made outside its layer's scope: named under the layer all the same
                path = f"{layer.name}/{segments[-1]}"
            if path in variables and variables[path] is not variable:
                raise ModelFileError(f"two variables share the path {path!r}; rename a layer")
            variables[path] = variable
    return variables


def model_file_bytes(model) -> bytes:
    """The registry file of `model`; the same model always gives the same bytes."""
    import keras
    from safetensors.numpy import save

    input_shape = tuple(int(v) for v in model.inputs[0].shape[1:])
    tensors = {
        WEIGHT_PREFIX + path: np.ascontiguousarray(np.asarray(variable.numpy()))
        for path, variable in variables_by_path(model).items()
    }
    tensors[PROBE_KEY] = model_outputs(model, probe_batch(input_shape))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "keras_config": model.to_json(),
        "keras_version": keras.__version__,
    }
    return save(tensors, metadata=metadata)


def save_model_file(model, destination: Path) -> None:
    """Write `model` as a registry model file."""
    Path(destination).write_bytes(model_file_bytes(model))


def read_header(handle: BinaryIO) -> dict:
    """The safetensors JSON header (tensor entries and `__metadata__`), read without the tensors."""
    prefix = handle.read(8)
    if len(prefix) != 8:
        raise ModelFileError("too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES:
        raise ModelFileError("the safetensors header is implausibly large")
    raw = handle.read(length)
    if len(raw) != length or not raw.startswith(b"{"):
        raise ModelFileError("not a safetensors header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ModelFileError("not a safetensors header")
    return header


def is_model_file(source: Path | BinaryIO) -> bool:
    """Whether `source` is a registry model file: a safetensors header naming this format."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as handle:
                header = read_header(handle)
        else:
            header = read_header(source)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    metadata = header.get("__metadata__")
    return isinstance(metadata, dict) and metadata.get("format") == FORMAT


def load_model_file(path: Path):
    """Rebuild the model in safe mode (no Lambda layers, no custom classes), set every variable
    by its path and check the probe outputs; ModelFileError says what is wrong."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(str(path), framework="np") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{Path(path).name} is not a registry model file")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"registry file format version {metadata.get('format_version')!r} is not supported")
    tensors = load_file(str(path))
    model = _build(metadata["keras_config"])
    set_weights_by_path(model, {k[len(WEIGHT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(WEIGHT_PREFIX)})
    if PROBE_KEY not in tensors:
        raise ModelFileError("the file has no probe outputs to check the model against")
    check_probe(model, tensors[PROBE_KEY])
    return model


def _build(config_json: str):
    import keras

    config = json.loads(config_json)
    config.pop("compile_config", None)  # served models are never compiled
    return keras.saving.deserialize_keras_object(config, safe_mode=True)


def set_weights_by_path(model, weights: dict[str, np.ndarray]) -> None:
    """Assign each variable the tensor stored under its path; every path exactly once, same shape."""
    variables = variables_by_path(model)
    missing = sorted(set(variables) - set(weights))
    extra = sorted(set(weights) - set(variables))
    if missing or extra:
        raise ModelFileError(
            "the stored weights do not match the model's variables: "
            f"missing {missing[:5] or 'none'}, unexpected {extra[:5] or 'none'}"
        )
    for path, variable in variables.items():
        value = weights[path]
        if tuple(value.shape) != tuple(variable.shape):
            raise ModelFileError(f"weight {path!r} is stored as {value.shape}, the model needs {tuple(variable.shape)}")
        variable.assign(value)


def check_probe(model, expected: np.ndarray) -> None:
    """Refuse a model whose outputs on the probe batch are not the ones recorded at import."""
    got = model_outputs(model, probe_batch(tuple(int(v) for v in model.inputs[0].shape[1:])))
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=PROBE_RTOL, atol=PROBE_ATOL):
        worst = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("nan")
        raise ModelFileError(
            f"the model does not give its recorded outputs on the probe images (largest difference {worst:.3g}): "
            "its weights were not restored as saved"
        )
