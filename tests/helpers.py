"""Helpers the tests share: tiny real Keras models and encoded images."""

from __future__ import annotations

import copy
import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
from PIL import Image

import model_store
from registry.model_spec import CIFAR10_CLASSES

CIFAR10 = list(CIFAR10_CLASSES)


def _database_of_this_worker(url: str | None) -> str | None:
    """The tests empty and refill their PostgreSQL database, so each pytest-xdist worker (make
    test runs two) has its own on the same server: imgcls_test_gw0, imgcls_test_gw1, ...
    (tests/conftest.py creates it). One process alone uses the database named."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not url or not worker:
        return url
    from sqlalchemy.engine import make_url

    named = make_url(url)
    return named.set(database=f"{named.database}_{worker}").render_as_string(hide_password=False)


# Set where TEST_DATABASE_URL names a PostgreSQL database (CI's: .ci/run): the tests that build the
# app run on it too (tests/conftest.py).
POSTGRES_URL = _database_of_this_worker(os.environ.get("TEST_DATABASE_URL"))


def create_postgres_database() -> None:
    """Create this worker's database (POSTGRES_URL) on the server when it does not exist yet."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if not os.environ.get("PYTEST_XDIST_WORKER") or not POSTGRES_URL:
        return
    name = make_url(POSTGRES_URL).database
    # Created from the database named in TEST_DATABASE_URL, which exists (the role needs CREATEDB).
    server = create_engine(os.environ["TEST_DATABASE_URL"], isolation_level="AUTOCOMMIT")
    try:
        with server.connect() as connection:
            exists = text("SELECT 1 FROM pg_database WHERE datname = :name")
            if connection.execute(exists, {"name": name}).first() is None:
                connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        server.dispose()


def build_seed_like_model(num_classes: int = 10, random_seed: int = 0):
    """A small Sequential CNN shaped like the seed document's: 32x32x3 in [0, 1], logits out."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(random_seed)
    return keras.Sequential(
        [
            keras.Input(shape=(32, 32, 3)),
            layers.Conv2D(4, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(num_classes),
        ]
    )


def image_bytes(fmt: str = "JPEG", size=(32, 32), color=(200, 30, 30), mode: str = "RGB", **save) -> bytes:
    """An encoded image of one colour."""
    image = Image.new(mode, size, color)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC, for PNGs made by hand."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few KB that claims width x height pixels but holds two rows: it opens, and
    decoding it fails (a decompression bomb, when large)."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    rows = zlib.compress(b"\x00" * (width * 3 + 1) * 2, 9)
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def classify(client, *contents, route="/api/v1/predict", **kwargs):
    """POST images as multipart field `image` (the API by default; route="/" for the page)."""
    files = [(io.BytesIO(content), f"{i}.png") for i, content in enumerate(contents)]
    return client.post(route, data={"image": files}, content_type="multipart/form-data", **kwargs)


def random_image_bytes(seed: int = 0, size=(32, 32), fmt: str = "PNG") -> bytes:
    """An encoded image of random pixels, different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


# Thresholds that make every answer of a calibrated model confident, unsure or unknown.
FORCED = {
    "confident": {"confidence_threshold": 0.0, "ood_threshold": 1e9},
    "unsure": {"confidence_threshold": 1.0, "ood_threshold": 1e9},
    "unknown": {"confidence_threshold": 0.0, "ood_threshold": -1e9},
}


def serve_registry(app) -> None:
    """Load what the registry assigns now, as a worker's poller does on its next round (the
    tests run without pollers: MODEL_POLL_SECONDS is 0)."""
    from web.extensions import model_serving

    model_serving.refresh(app)


def uniform_images(seed: int, n: int, low: int = 0, high: int = 256) -> np.ndarray:
    """n random 32 x 32 RGB images with pixels in [low, high), the same for each seed."""
    return np.random.default_rng(seed).integers(low, high, (n, 32, 32, 3), dtype=np.uint8)


def one_hot(ids, width: int) -> np.ndarray:
    """Row i is 1 at column ids[i], 0 elsewhere: features no two different ids share (np.eye(width)
    would build all width x width of them first)."""
    rows = np.zeros((len(ids), width))
    rows[np.arange(len(ids)), ids] = 1.0
    return rows


# (model file, spec, images, reference images) -> (calibration record, drift reference or None)
_fitted: dict[tuple, tuple] = {}


def fitted_calibration(app, row, images: int = 200, reference_images: int = 0) -> tuple[dict, object]:
    """A calibration of a registry version fitted for real on `images` random images (half to fit,
    half held out) and, with `reference_images`, its drift reference fitted on that many more.
    The same model file and images give the same fit, so each is fitted once per test process:
    most tests that need one store it and look at what the app does with it."""
    from serving import spec_of
    from training.calibration_fit import calibrate_model, fit_drift_reference

    spec = spec_of(row)
    key = (row.sha256, spec, images, reference_images)
    if key not in _fitted:
        model = model_store.load_keras_model(model_store.served_file(row, app.config["MODEL_CACHE_DIR"]))
        pixels, labels, half = uniform_images(1, images), np.arange(images) % 10, images // 2
        record = calibrate_model(model, spec, pixels[:half], labels[:half], pixels[half:], labels[half:])
        reference = None
        if reference_images:
            held_out = uniform_images(2, reference_images)
            reference = fit_drift_reference(model, spec, record, held_out, f"test: {reference_images} images")
        _fitted[key] = (record, reference)
    record, reference = _fitted[key]
    return copy.deepcopy(record), reference


def force_calibration(app, confidence_threshold: float, ood_threshold: float) -> dict:
    """Calibrate the active model for real on random images, then store the record with the
    given thresholds (see FORCED) and serve it; returns the stored record."""
    with app.app_context():
        row = model_store.get_active()
        record, _ = fitted_calibration(app, row)
        record["confidence_threshold"] = confidence_threshold
        record["ood"]["threshold"] = ood_threshold
        model_store.set_calibration(row.id, record)
    serve_registry(app)
    return record


def make_user(runner, name, role="member", password="correct horse"):
    """An account made with the CLI, as an operator makes one."""
    result = runner.invoke(args=["users", "create", name, "--role", role, "--password-stdin"], input=password + "\n")
    assert result.exit_code == 0, result.output
    return result


def make_key(runner, user, name="script"):
    """A new API key for `user`: the last line of `flask api-keys create`."""
    result = runner.invoke(args=["api-keys", "create", name, "--user", user])
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


def login(client, name, password="correct horse", **kwargs):
    return client.post("/login", data={"username": name, "password": password}, **kwargs)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def nobody_can_run_python() -> bool:
    """Whether a process that drops from root to nobody, as gunicorn's workers do, can still import
    Python's standard library (not where Python lives under /root, as pyenv installs it)."""
    drop = "import os; os.setgid(65534); os.setuid(65534); import secrets"
    return subprocess.run([sys.executable, "-c", drop], capture_output=True).returncode == 0


def gunicorn_user_env() -> dict[str, str]:
    """Environment for a test's gunicorn: as root where nobody cannot run this Python (the
    operator's explicit choice, WEB_USER=root), else nothing: its workers would die importing."""
    return {"WEB_USER": "root"} if os.geteuid() == 0 and not nobody_can_run_python() else {}
