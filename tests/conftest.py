"""Shared fixtures: a temporary instance folder and database, and tiny real Keras models."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import model_store
from app import create_app

CIFAR10 = list(model_store.CIFAR10_CLASSES)
# CI runs the suite a second time against PostgreSQL with this set (see .ci/run).
POSTGRES_URL = os.environ.get("TEST_DATABASE_URL")


def build_seed_like_model(num_classes: int = 10, seed: int = 0):
    """A small Sequential CNN shaped like the seed document's: 32x32x3 in [0, 1], logits out."""
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(shape=(32, 32, 3)),
            layers.Conv2D(4, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(num_classes),
        ]
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def seed_model_file(model_dir) -> Path:
    """A model saved exactly as the seed saves it: `model.save('modelo.h5')`."""
    path = model_dir / "modelo.h5"
    build_seed_like_model().save(path)
    return path


@pytest.fixture(scope="session")
def other_model_file(model_dir) -> Path:
    """A second 10-class model with different weights, for version switches."""
    path = model_dir / "other.h5"
    build_seed_like_model(seed=1).save(path)
    return path


@pytest.fixture(scope="session")
def three_class_model_file(model_dir) -> Path:
    path = model_dir / "three.keras"
    build_seed_like_model(num_classes=3, seed=2).save(path)
    return path


def drop_everything(app) -> None:
    """Empty a shared database (PostgreSQL) so each test starts from nothing."""
    with app.app_context():
        model_store.db.session.remove()
        model_store.db.drop_all()
        with model_store.db.engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS alembic_version"))


@pytest.fixture
def bare_app(tmp_path):
    """The real app on a temporary instance folder and an empty database (SQLite, or CI's PostgreSQL)."""
    app = create_app(
        {
            "TESTING": True,
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "SQLALCHEMY_DATABASE_URI": POSTGRES_URL or f"sqlite:///{tmp_path / 'test.sqlite'}",
            "SECRET_KEY": "test",
            "WTF_CSRF_ENABLED": False,
            "MODEL_POLL_SECONDS": 0,
        }
    )
    if POSTGRES_URL:
        drop_everything(app)
    yield app
    if POSTGRES_URL:
        drop_everything(app)


@pytest.fixture
def app(bare_app, seed_model_file):
    """The app with its schema created by the migrations and the seed-like model active."""
    with bare_app.app_context():
        model_store.init_db()
        model_store.import_model(seed_model_file, name="seed")
    return bare_app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def image_bytes(fmt: str = "JPEG", size=(32, 32), color=(200, 30, 30), mode: str = "RGB", **save) -> bytes:
    """An encoded image of one colour."""
    image = Image.new(mode, size, color)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def random_image_bytes(seed: int = 0, size=(32, 32), fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()
