"""Model files are untrusted: their validation load runs in a child process with limits.

A crafted HDF5 file can overflow a heap in the HDF5 library itself (Keras' safe mode works a
layer above it), and a file can declare weights large enough to exhaust memory. The import
therefore checks only the file's size in the parent, then recognises, opens and loads it in a
child process that reports what it found as JSON: whatever happens in there, the parent (the CLI
or a web worker) gets a clear ModelStoreError.

The child is confined as if the file ran code in it: `resource.setrlimit` caps its address space,
CPU seconds, open files, file size and processes; its environment is an allow-list (no secrets,
no DATABASE_URL); it works in a scratch folder holding only the file; and bubblewrap (`bwrap`)
gives it new network, PID and mount namespaces in which only the system's libraries, the Python
environment and this repository's source files exist (not instance/, the database or the secret
key), and a user namespace unless the parent is root, when the child runs as `nobody` instead
(setpriv, no capabilities). Where bubblewrap cannot start (not installed,
or user namespaces are off) the import is refused unless MODEL_IMPORT_CONFINE is false, which
keeps everything above but the namespaces.

The child also re-saves the model it loaded without HDF5 (registry/model_files.py), and that file is
what the registry stores: no h5py release compatible with TensorFlow bundles an HDF5 without
the heap overflows (see requirements.txt), so HDF5 is parsed only here, never in a web worker.
For the same reason `flask models export ID model.keras|model.h5` writes standard Keras files
here too (`export_in_child`). And it converts the model for the serving engine
(inference/lite_engine.py: a LiteRT file answering the OOD features and the explained feature map
too, checked against Keras), which the registry stores beside it (engine_store.py), so that a
web worker never imports TensorFlow.

Run as a script, this module is that child: `python model_sandbox.py FILE OUTPUT MEMORY_BYTES
CPU_SECONDS FILE_BYTES PROCESSES (NAME MAX_PARAMS ENGINE_OPTIONS | --export)`: it describes FILE,
saves the registry file to OUTPUT and the engine's file beside it (OUTPUT with the suffix
.tflite; ENGINE_OPTIONS is JSON: `convert_for_engine`'s options), or writes the registry file FILE
as the Keras file OUTPUT. It sets its own
limits first (a `preexec_fn` could deadlock when the parent is a threaded web worker).
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
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
    "OpenBLAS error: Memory allocation still failed",  # numpy's BLAS starting under the limit
)
CHILD_SCRIPT = Path(__file__).resolve()
SOURCE_ROOT = CHILD_SCRIPT.parent
BWRAP = "bwrap"
SANDBOX_DIR = "/sandbox"  # the child's working directory inside bubblewrap: the file, its output
UPLOAD_NAME = "upload"  # the file as the child receives it: it finds the format itself
SERVED_NAME = "served"
ENGINE_SUFFIX = ".tflite"  # the engine's file, written beside the served one
EXPORTED_NAME = "exported"  # + .keras or .h5: Keras picks the writer by the suffix
UNPRIVILEGED_USER = "nobody"  # whom the child runs as when the parent is root
# Everything the child's environment holds: nothing of the parent's (tokens, keys, DATABASE_URL).
CHILD_ENV = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "CUDA_VISIBLE_DEVICES": "",
    "TMPDIR": "/tmp",
}
# What the child sees of the file system, read-only, besides Python and the source files.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc/ld.so.cache", "/etc/localtime")
OPEN_FILES = 256  # TensorFlow opens about 100 (shared libraries, its thread pools' pipes)


@dataclass(frozen=True)
class ImportLimits:
    """Caps on a model file at import; `isolated` runs the validation load in a limited child."""

    max_bytes: int = 200 * 1024 * 1024
    max_params: int = 50_000_000
    memory_bytes: int = 4 * 1024**3  # address space: TensorFlow alone maps about 1.5 GB
    cpu_seconds: int = 300
    isolated: bool = True
    confined: bool = True  # in bubblewrap's namespaces; False: limits, environment and folder only

    @classmethod
    def from_config(cls, config) -> ImportLimits:
        """The limits an app's settings give (MODEL_MAX_BYTES, MODEL_IMPORT_* ...)."""
        return cls(
            max_bytes=int(config["MODEL_MAX_BYTES"]),
            max_params=int(config["MODEL_MAX_PARAMS"]),
            memory_bytes=int(config["MODEL_IMPORT_MEMORY_BYTES"]),
            cpu_seconds=int(config["MODEL_IMPORT_CPU_SECONDS"]),
            isolated=bool(config["MODEL_IMPORT_SANDBOX"]),
            confined=bool(config["MODEL_IMPORT_CONFINE"]),
        )

    @property
    def file_bytes(self) -> int:
        """The largest file the child may write: float64 weights at the parameter cap, plus room
        for the file's own structure."""
        return 8 * self.max_params + 64 * 1024**2

    @property
    def processes(self) -> int:
        """Processes and threads: TensorFlow starts a few pools about as wide as the CPU count."""
        return 256 + 8 * (os.cpu_count() or 1)


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


def describe_model_file(
    path: Path, filename: str, max_params: int, served_file: Path, engine_options: dict | None = None
) -> dict:
    """Open and load a model file and describe it (format, input shape, output width and kind,
    and under "engine" the metadata of its conversion for the serving engine), then save the
    loaded model to `served_file` as a registry model file (without HDF5) and its conversion
    beside it (`engine_file_of(served_file)`)."""
    import numpy as np

    from registry import model_formats

    fmt = model_formats.detect_format(path.read_bytes())
    if path.suffix != f".{fmt}":  # Keras picks its reader by the suffix; the child gets `upload`
        path = path.rename(path.with_suffix(f".{fmt}"))
    if fmt == "h5":
        try:
            stored = _h5_weight_count(path)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise SandboxError(f"{filename} is not a readable HDF5 file: {str(exc)[:200]}") from exc
        if stored > max_params:
            raise SandboxError(f"{filename} stores {stored:,} weights: the limit is {max_params:,} parameters")
    model = model_formats.load_keras_model(path, allow_hdf5=True)
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
    if fmt == model_formats.STORED_FORMAT:
        shutil.copyfile(path, served_file)  # a registry file, checked as it loaded: stored as it is
    else:
        _save_checked(model, filename, served_file)
    return {
        "format": fmt,
        "input_shape": [int(v) for v in input_shape[1:]],
        "output_width": int(output_shape[-1]),
        "output_kind": "probabilities" if getattr(activation, "__name__", "") == "softmax" else "logits",
        "engine": convert_for_engine(model, filename, engine_file_of(served_file), engine_options or {}),
    }


def engine_file_of(served_file: Path) -> Path:
    """Where the child writes the engine's conversion of the model it saved as `served_file`."""
    return served_file.with_suffix(ENGINE_SUFFIX)


def convert_for_engine(model, filename: str, engine_file: Path, options: dict) -> dict:
    """Convert the loaded model for the serving engine, write it to `engine_file` and return its
    metadata. Its pooled feature outputs are every block end of the network (the OOD layers any
    calibration picks by default, and the penultimate block) and `options["feature_layers"]` (a
    calibration's own), the deepest named as `penultimate_layer`; `options["explain_layer"]` is the
    metadata's Grad-CAM layer; `options["quantize"]` makes it dynamic-range int8 (`--engine int8`).
    The conversion is checked against Keras on a probe batch (lite_engine.convert)."""
    from inference import lite_engine, ood

    layers = tuple(dict.fromkeys([*options.get("feature_layers", ()), *ood.block_ends(model)]))
    try:
        converted = lite_engine.convert(
            model, layers, options.get("explain_layer"), quantize=options.get("quantize", False)
        )
    except lite_engine.ConversionError as exc:
        raise SandboxError(
            f"{filename}: its conversion for the serving engine does not answer as it does: {exc}"
        ) from exc
    except Exception as exc:  # the converter refusing an unusual graph or layer: a clear refusal all the same
        raise SandboxError(
            f"{filename}: it cannot be converted for the serving engine (LiteRT): {str(exc)[:300]}"
        ) from exc
    engine_file.write_bytes(converted.tflite)
    # What the label queue compares images by when the head has no closed form (LoadedModel.features).
    ends = ood.block_ends(model)
    return {**converted.metadata, "penultimate_layer": ends[-1] if ends else None}


def _save_checked(model, filename: str, served_file: Path) -> None:
    """Save the registry's file and load it back: loading checks it gives the model's outputs on
    the probe images (registry/model_files.py), as every later load will."""
    from registry import model_files

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

    from registry import model_files

    if destination.suffix not in EXPORT_SUFFIXES:
        raise SandboxError(f"{destination.name}: a Keras file is exported as .keras or .h5")
    model = model_files.load_model_file(source)
    model.save(destination)
    probe = model_files.probe_batch(tuple(int(v) for v in model.inputs[0].shape[1:]))
    reloaded = keras.saving.load_model(destination, compile=False, safe_mode=True)
    expected, got = model_files.model_outputs(model, probe), model_files.model_outputs(reloaded, probe)
    if not np.allclose(expected, got, rtol=model_files.PROBE_RTOL, atol=model_files.PROBE_ATOL):
        raise SandboxError(f"{destination.name}: the exported file does not give the stored model's outputs")


def _apply_limits(memory_bytes: int, cpu_seconds: int, file_bytes: int, processes: int) -> None:
    """In the child, before TensorFlow or h5py is imported."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NPROC, (processes, processes))


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


def describe_in_child(
    path: Path, filename: str, limits: ImportLimits, served_file: Path, engine_options: dict | None = None
) -> dict:
    """`describe_model_file` in a confined child process under `limits`; a SandboxError says why not."""
    served_name = SERVED_NAME + served_file.suffix
    outputs = {served_name: served_file, SERVED_NAME + ENGINE_SUFFIX: engine_file_of(served_file)}
    arguments = [filename, str(limits.max_params), json.dumps(engine_options or {})]
    return _in_child(path, outputs, arguments, filename, limits)


def export_in_child(source: Path, destination: Path, limits: ImportLimits) -> None:
    """`export_model_file` in a confined child process under `limits`; a SandboxError says why not."""
    _in_child(source, {EXPORTED_NAME + destination.suffix: destination}, [EXPORT_FLAG], destination.name, limits)


def _in_child(
    source: Path, outputs: dict[str, Path], arguments: list[str], filename: str, limits: ImportLimits
) -> dict:
    """Run the child on a copy of `source` alone in a scratch folder, copy each file it writes
    (`outputs`: its name there -> the target here) out, and return its JSON answer."""
    with tempfile.TemporaryDirectory(prefix="imgcls-import-") as scratch:
        folder = Path(scratch)
        shutil.copyfile(source, folder / UPLOAD_NAME)
        user = _child_user()
        if user:
            for owned in (folder, folder / UPLOAD_NAME):
                os.chown(owned, *user)
        result = _run_child(folder, next(iter(outputs)), arguments, filename, limits, user)
        if result.returncode != 0:
            raise SandboxError(_failure(result, filename, limits))
        for output_name, target in outputs.items():
            _copy_out(folder / output_name, target, filename)
        return json.loads(result.stdout.strip().splitlines()[-1])


def _child_user() -> tuple[int, int] | None:
    """(uid, gid) to run the child as: `nobody` when this process is root, else None (as is)."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(UNPRIVILEGED_USER)
    return entry.pw_uid, entry.pw_gid


def _drop_to(user: tuple[int, int]) -> list[str]:
    """setpriv (util-linux): become `user` with no groups, no capabilities, none to gain."""
    uid, gid = user
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ]


def _run_child(
    folder: Path,
    output_name: str,
    arguments: list[str],
    filename: str,
    limits: ImportLimits,
    user: tuple[int, int] | None,
) -> subprocess.CompletedProcess:
    workdir = SANDBOX_DIR if limits.confined else str(folder)
    command = [
        sys.executable,
        "-E",  # no PYTHON* variables (none reach it anyway), no user site, no bytecode written
        "-s",
        "-B",
        str(CHILD_SCRIPT),
        f"{workdir}/{UPLOAD_NAME}",
        f"{workdir}/{output_name}",
        str(limits.memory_bytes),
        str(limits.cpu_seconds),
        str(limits.file_bytes),
        str(limits.processes),
        *arguments,
    ]
    if user:
        command = [*_drop_to(user), *command]
    if limits.confined:
        command = [*_bwrap_arguments(folder, as_root=user is not None), *command]
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env={**CHILD_ENV, "HOME": workdir},
            cwd=folder,
            timeout=limits.cpu_seconds * 4,  # wall clock: a child sleeping instead of computing
        )
    except subprocess.TimeoutExpired as exc:
        raise SandboxError(f"{filename}: validating it took longer than {exc.timeout:.0f} s and was stopped") from exc
    except FileNotFoundError as exc:
        raise SandboxError(_no_confinement(f"{exc.filename or command[0]} is not installed")) from exc
    if limits.confined and result.returncode == 1 and result.stderr.startswith("bwrap:"):
        raise SandboxError(_no_confinement(result.stderr.strip().splitlines()[0]))
    return result


def _bwrap_arguments(folder: Path, as_root: bool) -> list[str]:
    """bubblewrap: new namespaces (network, PID, IPC, UTS, mount; user unless root, whose child
    drops to `nobody` inside by setpriv) and a file system of the system's libraries, Python and
    the source files, read-only, with `folder` as the one writable place."""
    namespaces = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    arguments = [BWRAP, *(namespaces if as_root else ["--unshare-all", "--cap-drop", "ALL"])]
    arguments += ["--die-with-parent", "--new-session"]
    arguments += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    visible = [str(path) for path in (*SYSTEM_PATHS, sys.prefix, sys.base_prefix, sys.exec_prefix, *_source_files())]
    # The folders above them, which bubblewrap would otherwise make for its own user only (0700).
    for above in sorted({str(parent) for path in visible for parent in Path(path).parents} - {"/"}):
        arguments += ["--perms", "0755", "--dir", above]
    for path in visible:
        arguments += ["--ro-bind-try", path, path]
    return [*arguments, "--bind", str(folder), SANDBOX_DIR, "--chdir", SANDBOX_DIR]


def _source_files() -> list[Path]:
    """The repository's modules and packages the child imports from: not instance/, models/ or .git."""
    found = [item for item in SOURCE_ROOT.iterdir() if item.suffix == ".py" or (item / "__init__.py").is_file()]
    return [*found, CHILD_SCRIPT]


def _no_confinement(reason: str) -> str:
    return (
        f"the import sandbox could not start ({reason}): model files are validated only inside "
        f"bubblewrap's namespaces (install bubblewrap, and allow unprivileged user namespaces), or set "
        f"MODEL_IMPORT_CONFINE=false to validate them in a child with limits but no namespaces"
    )


def _copy_out(source: Path, target: Path, filename: str) -> None:
    """The child's output into `target`: a regular file with one link only, never a link the child
    left to a file it could not read but this process can."""
    try:
        handle = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SandboxError(f"{filename}: the validating process left no model file ({exc.strerror})") from exc
    with os.fdopen(handle, "rb") as child_file:
        status = os.fstat(child_file.fileno())
        if not stat.S_ISREG(status.st_mode) or status.st_nlink != 1:
            raise SandboxError(f"{filename}: the validating process left something other than a model file")
        with target.open("wb") as copy:
            shutil.copyfileobj(child_file, copy)


def _child(argv: list[str]) -> int:
    path, output = Path(argv[0]), Path(argv[1])
    _apply_limits(*(int(value) for value in argv[2:6]))
    from registry import model_files
    from registry.model_formats import ModelStoreError

    try:
        if argv[6] == EXPORT_FLAG:
            export_model_file(path, output)
            described = {"exported": output.name}
        else:
            described = describe_model_file(path, argv[6], int(argv[7]), output, json.loads(argv[8]))
    except (SandboxError, ModelStoreError, model_files.ModelFileError) as exc:
        print(json.dumps({"error": str(exc)}))
        return ERROR_EXIT
    print(json.dumps(described))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(_child(sys.argv[1:]))
