"""Model files are untrusted: their validation load runs in a child process with limits.

A crafted HDF5 file can overflow a heap in the HDF5 library itself (Keras' safe mode works a
layer above it), and a file can declare weights large enough to exhaust memory. The import
therefore checks the file's size in the parent, then opens and loads it in a child process
limited by `resource.setrlimit` (address space and CPU seconds) that reports what it found as
JSON: whatever happens in there, the parent (the CLI) gets a clear ModelStoreError.

The child also re-saves the model it loaded without HDF5 (model_files.py), and that file is
what the registry stores: no h5py release compatible with TensorFlow bundles an HDF5 without
the heap overflows (see requirements.txt), so HDF5 is parsed only here, never in a web worker.
For the same reason `flask models export ID model.keras|model.h5` writes standard Keras files
here too (`export_in_child`).

Run as a script, this module is that child:
`python model_sandbox.py FILE NAME MAX_PARAMS SERVED_FILE MEMORY_BYTES CPU_SECONDS`, or
`python model_sandbox.py --export REGISTRY_FILE DESTINATION MEMORY_BYTES CPU_SECONDS`; it sets its
own limits first (a `preexec_fn` could deadlock when the parent is a threaded web worker).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ERROR_EXIT = 2  # the child found the file unacceptable and printed why
EXPORT_FLAG = "--export"
EXPORT_SUFFIXES = (".keras", ".h5")
# A shared library that cannot be mapped under the address-space limit is the same failure.
MEMORY_MARKERS = (
    "MemoryError",
    "bad_alloc",
    "Cannot allocate memory",
    "SystemError: error return without exception",
    "failed to map segment from shared object",
    "Memory allocation still failed",  # OpenBLAS, when numpy loads it under the limit
)


@dataclass(frozen=True)
class ImportLimits:
    """Caps on a model file at import; `isolated` runs the validation load in a limited child."""

    max_bytes: int = 200 * 1024 * 1024
    max_params: int = 50_000_000
    memory_bytes: int = 4 * 1024**3  # address space: TensorFlow alone maps about 1.5 GB
    cpu_seconds: int = 300
    isolated: bool = True

    @classmethod
    def from_config(cls, config) -> ImportLimits:
        """The limits an app's settings give (MODEL_MAX_BYTES, MODEL_IMPORT_* ...)."""
        return cls(
            max_bytes=int(config["MODEL_MAX_BYTES"]),
            max_params=int(config["MODEL_MAX_PARAMS"]),
            memory_bytes=int(config["MODEL_IMPORT_MEMORY_BYTES"]),
            cpu_seconds=int(config["MODEL_IMPORT_CPU_SECONDS"]),
            isolated=bool(config["MODEL_IMPORT_SANDBOX"]),
        )


class SandboxError(Exception):
    """The file was refused inside the sandbox; model_store turns it into a ModelStoreError."""


def check_size(size: int, filename: str, limits: ImportLimits) -> None:
    if size > limits.max_bytes:
        raise SandboxError(
            f"{filename} is {size / 1e6:.1f} MB: the limit for a model file is {limits.max_bytes / 1e6:.0f} MB"
        )


def _h5_weight_count(path: Path) -> int:
    """Parameters stored in an .h5 file, from the datasets' shapes, before Keras builds anything."""
    import h5py

    total = 0

    def add(_name, item):
        nonlocal total
        if isinstance(item, h5py.Dataset):
            total += int(item.size)

    with h5py.File(path, "r") as handle:
        handle.visititems(add)
    return total


def describe_model_file(path: Path, filename: str, max_params: int, served_file: Path) -> dict:
    """Open and load a model file and describe it (format, input shape, output width and kind),
    then save the loaded model to `served_file` as a registry model file (without HDF5)."""
    import numpy as np

    import model_store

    fmt = model_store.detect_format(path.read_bytes())
    if fmt == "h5":
        try:
            stored = _h5_weight_count(path)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise SandboxError(f"{filename} is not a readable HDF5 file: {str(exc)[:200]}") from exc
        if stored > max_params:
            raise SandboxError(f"{filename} stores {stored:,} weights: the limit is {max_params:,} parameters")
    model = model_store.load_keras_model(path, allow_hdf5=True)
    if model.count_params() > max_params:
        raise SandboxError(f"{filename} has {model.count_params():,} parameters: the limit is {max_params:,}")
    inputs = getattr(model, "inputs", None) or []
    outputs = getattr(model, "outputs", None) or []
    if len(inputs) != 1 or len(outputs) != 1:
        raise SandboxError(f"{filename}: the model must have one input and one output")
    input_shape = tuple(inputs[0].shape)
    if len(input_shape) != 4 or input_shape[-1] != 3 or None in input_shape[1:]:
        raise SandboxError(
            f"{filename}: the input is not an image tensor: expected (batch, height, width, 3), got {input_shape}"
        )
    output_shape = tuple(outputs[0].shape)
    if len(output_shape) != 2 or output_shape[-1] is None:
        raise SandboxError(f"{filename}: the output must be (batch, classes), got {output_shape}")
    probe = np.full((2, *input_shape[1:]), 0.5, np.float32)
    if not np.isfinite(np.asarray(model(probe, training=False))).all():
        raise SandboxError(f"{filename}: the model's output on a test image is not finite (NaN or infinity)")
    activation = getattr(model.layers[-1], "activation", None)
    if fmt == model_store.STORED_FORMAT:
        shutil.copyfile(path, served_file)  # a registry file, checked as it loaded: stored as it is
    else:
        _save_checked(model, filename, served_file)
    return {
        "format": fmt,
        "input_shape": [int(v) for v in input_shape[1:]],
        "output_width": int(output_shape[-1]),
        "output_kind": "probabilities" if getattr(activation, "__name__", "") == "softmax" else "logits",
    }


def _save_checked(model, filename: str, served_file: Path) -> None:
    """Save the registry's file and load it back: loading checks it gives the model's outputs on
    the probe images (model_files.py), as every later load will."""
    import model_files

    odd = sorted({str(w.dtype) for w in model.get_weights() if w.dtype.kind not in "biuf"})
    if odd:
        raise SandboxError(f"{filename}: weights of type {', '.join(odd)} cannot be stored; use float32")
    try:
        model_files.save_model_file(model, served_file)
        model_files.load_model_file(served_file)
    except model_files.ModelFileError as exc:
        raise SandboxError(f"{filename}: the model cannot be stored without HDF5: {exc}") from exc


def export_model_file(source: Path, destination: Path) -> None:
    """Write the registry file `source` as a standard Keras file (`.keras` or `.h5`, by the
    destination's suffix) and check that plain `keras.saving.load_model` gives the same outputs."""
    import keras
    import numpy as np

    import model_files

    if destination.suffix not in EXPORT_SUFFIXES:
        raise SandboxError(f"{destination.name}: a Keras file is exported as .keras or .h5")
    model = model_files.load_model_file(source)
    model.save(destination)
    probe = model_files.probe_batch(tuple(int(v) for v in model.inputs[0].shape[1:]))
    reloaded = keras.saving.load_model(destination, compile=False, safe_mode=True)
    expected, got = model_files.model_outputs(model, probe), model_files.model_outputs(reloaded, probe)
    if not np.allclose(expected, got, rtol=model_files.PROBE_RTOL, atol=model_files.PROBE_ATOL):
        raise SandboxError(f"{destination.name}: the exported file does not give the stored model's outputs")


def _apply_limits(memory_bytes: int, cpu_seconds: int) -> None:
    """In the child, before TensorFlow or h5py is imported."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _failure(result: subprocess.CompletedProcess, filename: str, limits: ImportLimits) -> str:
    """Why the child did not describe the file, in words."""
    if result.returncode == ERROR_EXIT and result.stdout.strip():
        return json.loads(result.stdout.strip().splitlines()[-1])["error"]
    stderr = result.stderr.decode(errors="replace") if isinstance(result.stderr, bytes) else result.stderr
    if result.returncode in (-signal.SIGXCPU, -signal.SIGKILL) and "MemoryError" not in stderr:
        return f"{filename}: loading it used more than {limits.cpu_seconds} s of CPU and was stopped"
    last = stderr.strip().splitlines()[-1][:300] if stderr.strip() else f"exit code {result.returncode}"
    # An allocation refused by RLIMIT_AS surfaces as MemoryError in Python, bad_alloc in C++, or
    # (inside C extensions such as numpy's) a SystemError without an exception set.
    if any(marker in stderr for marker in MEMORY_MARKERS):
        limit_gb = limits.memory_bytes / 1024**3
        return f"{filename}: loading it needs more than the {limit_gb:.1f} GB of memory the import allows ({last})"
    if result.returncode < 0:
        return f"{filename}: loading it crashed the validating process ({signal.Signals(-result.returncode).name})"
    return f"{filename}: the file could not be validated: {last}"


def describe_in_child(path: Path, filename: str, limits: ImportLimits, served_file: Path) -> dict:
    """`describe_model_file` in a child process under `limits`; a SandboxError says why not."""
    arguments = [str(path), filename, str(limits.max_params), str(served_file)]
    return _run_child(arguments, filename, limits)


def export_in_child(source: Path, destination: Path, limits: ImportLimits) -> None:
    """`export_model_file` in a child process under `limits`; a SandboxError says why not."""
    _run_child([EXPORT_FLAG, str(source), str(destination)], destination.name, limits)


def _run_child(arguments: list[str], filename: str, limits: ImportLimits) -> dict:
    """Run this module as the child with `arguments` and the limits; its JSON answer."""
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, *arguments, str(limits.memory_bytes), str(limits.cpu_seconds)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parent,
            timeout=limits.cpu_seconds * 4,  # wall clock: a child sleeping instead of computing
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{filename}: validating it took longer than {exc.timeout:.0f} s and was stopped") from exc
    if result.returncode != 0:
        raise SandboxError(_failure(result, filename, limits))
    return json.loads(result.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> int:
    _apply_limits(int(argv[-2]), int(argv[-1]))
    import model_files
    import model_store

    try:
        if argv[0] == EXPORT_FLAG:
            export_model_file(Path(argv[1]), Path(argv[2]))
            described = {"exported": argv[2]}
        else:
            path, filename, max_params, served_file = Path(argv[0]), argv[1], int(argv[2]), Path(argv[3])
            described = describe_model_file(path, filename, max_params, served_file)
    except (SandboxError, model_store.ModelStoreError, model_files.ModelFileError) as exc:
        print(json.dumps({"error": str(exc)}))
        return ERROR_EXIT
    print(json.dumps(described))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(_child(sys.argv[1:]))
