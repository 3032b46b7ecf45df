"""Fixtures: the real app on a temporary instance folder and database (SQLite, or PostgreSQL when
TEST_DATABASE_URL is set), and tiny real Keras models saved as the seed saves its own."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import text

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers import POSTGRES_URL, build_seed_like_model, serve_registry

import model_store
from app import create_app
from database import db


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
    build_seed_like_model(random_seed=1).save(path)
    return path


@pytest.fixture(scope="session")
def three_class_model_file(model_dir) -> Path:
    path = model_dir / "three.keras"
    build_seed_like_model(num_classes=3, random_seed=2).save(path)
    return path


def _drop_everything(app: Flask) -> None:
    """Empty a shared database (PostgreSQL) so each test starts from nothing."""
    with app.app_context():
        db.session.remove()
        db.drop_all()
        with db.engine.begin() as connection:
            connection.execute(text("DROP TABLE IF EXISTS alembic_version"))


@pytest.fixture
def make_app(tmp_path) -> Callable[..., Flask]:
    """Build the real app on a temporary instance folder; keyword arguments override the test
    configuration. Every app of a test shares the test's database: a fresh SQLite file, or CI's
    PostgreSQL, emptied before and after."""
    database_uri = POSTGRES_URL or f"sqlite:///{tmp_path / 'test.sqlite'}"
    built: list[Flask] = []

    def build(instance: str = "instance", **overrides) -> Flask:
        config = {
            "TESTING": True,
            "INSTANCE_PATH": str(tmp_path / instance),
            "SQLALCHEMY_DATABASE_URI": database_uri,
            "SECRET_KEY": "test",
            "WTF_CSRF_ENABLED": False,
            # Limits are off unless a test is about them: the suite sends hundreds of requests.
            "RATELIMIT_ENABLED": False,
            "MODEL_POLL_SECONDS": 0,
            # A sandboxed import starts TensorFlow in a child process (seconds); tests/test_sandbox.py
            # covers that path, the others validate in-process under the same caps.
            "MODEL_IMPORT_SANDBOX": False,
        }
        app = create_app({**config, **overrides})
        if POSTGRES_URL and not built:
            _drop_everything(app)
        built.append(app)
        return app

    yield build
    if POSTGRES_URL and built:
        _drop_everything(built[0])
    for app in built:  # close each app's pooled connections now, not when the collector finds them
        with app.app_context():
            db.engine.dispose()


@pytest.fixture
def bare_app(make_app) -> Flask:
    """The real app on an empty database."""
    return make_app()


@pytest.fixture
def app(bare_app, seed_model_file) -> Flask:
    """The app with its schema created by the migrations and the seed-like model active and served."""
    with bare_app.app_context():
        model_store.init_db()
        model_store.import_model(seed_model_file, name="seed")
    serve_registry(bare_app)
    return bare_app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()
