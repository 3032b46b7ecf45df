"""Model import in a sandbox: caps on file size and parameters, and the validation load in a child
process under memory and CPU limits, so a hostile file fails the import with a clear message; the
child is confined (environment, folder, limits, namespaces) as if the file ran code in it."""

import json
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

import engine_store
import model_sandbox
import model_store
from model_sandbox import CHILD_ENV, OPEN_FILES, SOURCE_ROOT, ImportLimits
from model_store import ModelStoreError
from registry import model_formats

ISOLATED = ImportLimits(isolated=True)
pytestmark = pytest.mark.backend_independent(
    "the import child never opens the database; what the parent stores or exports after it is the "
    "in-process import's and export's, which test_model_store and test_cli run on PostgreSQL"
)


def refused(app, path, limits) -> str:
    with app.app_context(), pytest.raises(ModelStoreError) as caught:
        model_store.import_model(path, name="hostile", limits=limits)
    with app.app_context():
        assert [row.name for row in model_store.list_models()] == ["seed"]  # nothing was stored
    return str(caught.value)


def test_a_file_over_the_size_cap_is_refused_before_it_is_read(app, seed_model_file):
    message = refused(app, seed_model_file, ImportLimits(max_bytes=1000))
    assert "the limit for a model file is" in message


def test_a_model_over_the_parameter_cap_is_refused_in_the_child(app, seed_model_file):
    message = refused(app, seed_model_file, ImportLimits(max_params=100, isolated=True))
    assert "weights: the limit is 100 parameters" in message


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_crafted_or_truncated_hdf5_file_is_refused_in_the_child(app, seed_model_file, tmp_path, damage):
    data = seed_model_file.read_bytes()
    hostile = data[: len(data) // 3] if damage == "truncated" else data[:8] + b"\xff" * 4096
    path = tmp_path / "hostile.h5"
    path.write_bytes(hostile)
    assert "not a readable HDF5 file" in refused(app, path, ISOLATED)


def test_a_child_over_the_memory_limit_is_a_clear_error(app, seed_model_file):
    message = refused(app, seed_model_file, ImportLimits(memory_bytes=64 * 1024**2, isolated=True))
    assert "needs more than the 0.1 GB of memory the import allows" in message


def test_the_cli_survives_a_hostile_file(app, runner, seed_model_file, tmp_path):
    app.config.update(MODEL_IMPORT_SANDBOX=True, MODEL_IMPORT_MEMORY_BYTES=64 * 1024**2)
    result = runner.invoke(args=["models", "import", str(seed_model_file)])
    assert result.exit_code == 1 and "import refused, nothing was stored" in result.output
    assert "of memory the import allows" in result.output
    assert runner.invoke(args=["models", "list"]).exit_code == 0


@pytest.mark.slow
def test_the_cli_imports_a_good_model_through_the_sandbox(app, runner, other_model_file):
    app.config.update(MODEL_IMPORT_SANDBOX=True)
    result = runner.invoke(args=["models", "import", str(other_model_file), "--name", "checked"])
    assert result.exit_code == 0, result.output
    with app.app_context():
        row = next(row for row in model_store.list_models() if row.name == "checked")
        assert row.input_shape == [32, 32, 3] and row.output_kind == "logits"
        # The child converted it for the serving engine too, and the parent stored that beside it.
        engine = engine_store.get(row.sha256)
        assert engine.details["format"] == "litert-fp32" and max(engine.details["probe_max_abs_diff"]) <= 1e-4


# Stands in for the child's script: the real child (`_child`: limits, then the description) with
# the description replaced by a report of what the child can see, sent back as its refusal.
PROBE = """
import json, os, resource, socket, sys
sys.path.insert(0, {root!r})
import model_sandbox


def reachable(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


def outside_uid():
    uid = os.getuid()
    for line in open("/proc/self/uid_map"):
        inside, outside, count = (int(field) for field in line.split())
        if inside <= uid < inside + count:
            return outside + uid - inside


def report(path, filename, max_params, served_file, engine_options):
    names = ("AS", "CPU", "NOFILE", "FSIZE", "NPROC", "CORE")
    raise model_sandbox.SandboxError(json.dumps({{
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "files": sorted(os.listdir(".")),
        "limits": {{name: resource.getrlimit(getattr(resource, "RLIMIT_" + name)) for name in names}},
        "reached": reachable({port}),
        "interfaces": sorted(name for _, name in socket.if_nameindex()),
        "visible": [path for path in {secret_paths!r} if os.path.exists(path)],
        "uid": outside_uid(),
    }}))


model_sandbox.describe_model_file = report
sys.exit(model_sandbox._child(sys.argv[1:]))
"""
SECRETS = {
    "FLASK_METRICS_TOKEN": "metrics-sentinel",
    "DATABASE_URL": "postgresql://db-sentinel",
    "SECRET_KEY": "key-sentinel",
}


def bwrap_works() -> bool:
    try:
        return (
            subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"], capture_output=True).returncode
            == 0
        )
    except FileNotFoundError:
        return False


def report_from_inside(app, runner, model_file, tmp_path, monkeypatch, **config) -> dict:
    """Run `flask models import` with the probe as the child; what the probe saw from inside."""
    listener = socket.create_server(("127.0.0.1", 0))  # the parent's network: the child must not reach it
    instance = Path(app.instance_path)
    (instance / "secret_key").write_text("instance-secret")
    secret_paths = [
        str(instance),
        str(instance / "secret_key"),
        str(model_file),  # the child gets a copy, not the operator's folders
        str(tmp_path),  # the test database (SQLite) lives here
        str(SOURCE_ROOT / ".git"),
        str(SOURCE_ROOT / "models"),
        "/etc/passwd",
    ]
    assert all(Path(path).exists() for path in secret_paths)  # here: the child must not see them
    # Beside the temporary folders, not in pytest's (0700): `nobody` must be able to read it.
    probe = Path(tempfile.mkdtemp()) / "probe.py"
    probe.parent.chmod(0o755)
    probe.write_text(PROBE.format(root=str(SOURCE_ROOT), port=listener.getsockname()[1], secret_paths=secret_paths))
    monkeypatch.setattr(model_sandbox, "CHILD_SCRIPT", probe)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    # The parent does not parse the file (not even a zip's directory): the child recognises it.
    monkeypatch.setattr(model_formats, "detect_format", lambda data: pytest.fail("the parent read the file's format"))
    app.config.update(MODEL_IMPORT_SANDBOX=True, **config)
    try:
        with listener:
            result = runner.invoke(args=["models", "import", str(model_file)])
    finally:
        shutil.rmtree(probe.parent)
    assert result.exit_code == 1 and "import refused" in result.output and "{" in result.output, result.output
    return json.loads(result.output[result.output.index("{") : result.output.rindex("}") + 1])


def assert_environment_folder_and_limits(seen: dict, limits: ImportLimits) -> None:
    assert set(seen["env"]) <= {*CHILD_ENV, "HOME", "PWD"}, seen["env"]  # bubblewrap sets PWD
    assert not set(SECRETS.values()) & set(seen["env"].values())
    assert seen["files"] == ["upload"] and seen["env"]["HOME"] == seen["env"].get("PWD", seen["cwd"]) == seen["cwd"]
    assert Path(seen["cwd"]) != SOURCE_ROOT
    assert seen["limits"] == {
        "AS": [limits.memory_bytes] * 2,
        "CPU": [limits.cpu_seconds, limits.cpu_seconds + 5],
        "NOFILE": [OPEN_FILES] * 2,
        "FSIZE": [limits.file_bytes] * 2,
        "NPROC": [limits.processes] * 2,
        "CORE": [0, 0],
    }
    assert seen["uid"] != 0  # started as root, the child is `nobody`


@pytest.mark.skipif(not bwrap_works(), reason="bubblewrap cannot create namespaces on this machine")
def test_from_inside_the_import_child_sees_no_secret_no_network_and_only_its_file(
    app, runner, seed_model_file, tmp_path, monkeypatch
):
    seen = report_from_inside(app, runner, seed_model_file, tmp_path, monkeypatch)
    assert_environment_folder_and_limits(seen, ImportLimits.from_config(app.config))
    assert seen["cwd"] == model_sandbox.SANDBOX_DIR
    assert not seen["reached"] and seen["interfaces"] == ["lo"]
    assert seen["visible"] == []


def test_without_namespaces_the_child_still_has_an_allow_listed_environment_a_scratch_folder_and_limits(
    app, runner, seed_model_file, tmp_path, monkeypatch
):
    seen = report_from_inside(app, runner, seed_model_file, tmp_path, monkeypatch, MODEL_IMPORT_CONFINE=False)
    assert_environment_folder_and_limits(seen, ImportLimits.from_config(app.config))


def test_an_import_is_refused_when_the_sandbox_cannot_start(app, monkeypatch):
    monkeypatch.setattr(model_sandbox, "BWRAP", "/nonexistent/bwrap")
    message = refused(app, Path(model_sandbox.__file__), ISOLATED)
    assert "the import sandbox could not start" in message and "MODEL_IMPORT_CONFINE=false" in message


@pytest.mark.slow  # TensorFlow in a child process, as the good import above
def test_export_to_h5_is_written_in_the_child_and_loads_in_plain_keras(app, seed_model_file, tmp_path):
    import keras
    import numpy as np

    with app.app_context():
        written = model_store.export(1, tmp_path / "back.h5", ISOLATED)
    images = np.random.default_rng(6).random((2, 32, 32, 3), dtype=np.float32)
    expected = keras.models.load_model(seed_model_file, compile=False)(images)
    got = keras.models.load_model(written, compile=False)(images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
