"""The SQL database: the Flask-SQLAlchemy handle, Alembic migrations and SQLite tuning.

`open_database` gives scripts outside the web app (train.py --import) an application context
bound to the same database, so they use the registry without importing the app.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event

PROJECT_ROOT = Path(__file__).resolve().parent
MIGRATIONS_DIR = PROJECT_ROOT / "migrations"

db = SQLAlchemy()
migrate = Migrate(directory=str(MIGRATIONS_DIR))


def instance_path(override: str | None = None) -> Path:
    """The instance folder: `override`, else INSTANCE_PATH, else `instance/` beside this file."""
    chosen = override or os.environ.get("INSTANCE_PATH")
    return Path(chosen).resolve() if chosen else PROJECT_ROOT / "instance"


def database_uri(instance: Path) -> str:
    """DATABASE_URL (postgresql:// runs on psycopg 3), else a SQLite file in the instance folder."""
    url = os.environ.get("DATABASE_URL")
    if url and url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url or f"sqlite:///{instance / 'app.sqlite'}"


def init_app(app: Flask) -> None:
    """Bind the database and the migrations to an app configured with SQLALCHEMY_DATABASE_URI."""
    db.init_app(app)
    migrate.init_app(app, db)
    with app.app_context():
        _private_sqlite_file(db.engine)
        _tune_sqlite(db.engine)


def _private_sqlite_file(engine) -> None:
    """The SQLite file holds every kept photo: create it 0600 (or make it so). SQLite gives its
    -wal and -shm files the database file's permissions, so they are 0600 too."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:":
        return
    # Only a file that does not exist yet is opened here: closing any descriptor of the database
    # file drops every POSIX lock this process holds on it, SQLite's included. A process with a
    # connection open (a script that builds a second app) would then look closed to the others,
    # and the next one to close would checkpoint and delete the WAL under it: a corrupt database.
    with suppress(FileExistsError):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
    os.chmod(path, 0o600)


def _tune_sqlite(engine) -> None:
    """WAL and a busy timeout, so several workers read and write without "database is locked"."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine, "connect")
    def set_pragmas(connection, _record):
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=10000")
        # In WAL mode NORMAL still never corrupts the database; it skips an fsync per commit,
        # which every recorded prediction would otherwise pay.
        cursor.execute("PRAGMA synchronous=NORMAL")
        # SQLite ignores foreign keys (and so ON DELETE SET NULL) unless asked.
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


@contextmanager
def open_database(uri: str | None = None) -> Iterator[None]:
    """An application context on the configured database (or `uri`), for scripts."""
    instance = instance_path()
    instance.mkdir(parents=True, exist_ok=True)
    app = Flask("database", instance_path=str(instance))
    app.config["SQLALCHEMY_DATABASE_URI"] = uri or database_uri(instance)
    init_app(app)
    with app.app_context():
        yield
