"""Fixtures: the real app on a temporary instance folder and database (SQLite, or PostgreSQL when
TEST_DATABASE_URL is set), and tiny real Keras models saved as the seed saves its own.

The migrations run and the seed-like model is imported once per test session and backend, into a
template; each test that asks for `app` starts from a copy of it (SQLite: the file copied;
PostgreSQL: the tables emptied and the template's rows put back), the same state the migrations
and the import would give, without paying for them in every test. Every test that builds the app
is marked `db` unless it is marked `backend_independent(reason)`; when TEST_DATABASE_URL is set,
each `db` test runs twice in the same session, `[sqlite]` and `[postgresql]` (a `postgresql_only`
one on PostgreSQL alone; skipped without it).
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
import shutil
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import jinja2
import numpy as np
import pytest
from flask import Flask
from sqlalchemy import MetaData, text

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from helpers import POSTGRES_URL, build_seed_like_model, create_postgres_database, serve_registry

import model_store
from app import create_app
from database import db

BASE_CONFIG = {
    "TESTING": True,
    "SECRET_KEY": "test",
    "WTF_CSRF_ENABLED": False,
    # Limits are off unless a test is about them: the suite sends hundreds of requests.
    "RATELIMIT_ENABLED": False,
    "MODEL_POLL_SECONDS": 0,
    # A sandboxed import starts TensorFlow in a child process (seconds); tests/test_sandbox.py
    # covers that path, the others validate in-process under the same caps.
    "MODEL_IMPORT_SANDBOX": False,
    # werkzeug's scrypt at 1/32 of the default work: every account made and log-in would cost 0.15 s
    # of CPU (some 150 per pass). tests/test_sessions.py checks the configured method and its floor.
    "PASSWORD_HASH_METHOD": "scrypt:1024:8:1",
}


BACKENDS = ("sqlite", "postgresql") if POSTGRES_URL else ("sqlite",)


IN_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))


def _exit_without_finalizing() -> None:
    """A pytest-xdist worker has sent its reports when Python exits: tearing TensorFlow down
    would only keep the run waiting (2 s a worker)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if IN_WORKER:
    atexit.register(_exit_without_finalizing)  # registered early: the last of the exit handlers to run


def pytest_configure(config) -> None:
    create_postgres_database()


def pytest_generate_tests(metafunc) -> None:
    """Each test that builds the app runs on every backend there is (`database_backend`), unless
    it is `backend_independent` (SQLite) or `postgresql_only`. Without PostgreSQL nothing is
    parametrized, so test ids stay as written."""
    if "database_backend" not in metafunc.fixturenames or len(BACKENDS) == 1:
        return
    if metafunc.definition.get_closest_marker("postgresql_only"):
        backends = ["postgresql"]
    elif metafunc.definition.get_closest_marker("backend_independent"):
        backends = ["sqlite"]
    else:
        backends = list(BACKENDS)
    if backends != ["sqlite"]:  # the default, without a parameter (test ids as written)
        # Module scope: a module's tests are grouped by backend, so module_app is built once for each.
        metafunc.parametrize("database_backend", backends, indirect=True, scope="module")


def pytest_collection_modifyitems(items) -> None:
    """Mark `db` every test that builds the app (make_app is under app, client, runner, bare_app;
    module_app builds one for a whole module), unless it is marked `backend_independent` with the
    reason its outcome cannot depend on which database the app runs on (the rule: docs/testing.md,
    "Which tests run twice")."""
    no_postgresql = pytest.mark.skip(reason="no PostgreSQL: set TEST_DATABASE_URL (CI runs .ci/start-postgres)")
    for item in items:
        if item.get_closest_marker("postgresql_only") and "postgresql" not in BACKENDS:
            item.add_marker(no_postgresql)
        if not {"make_app", "module_app"} & set(getattr(item, "fixturenames", ())):
            continue
        independent = item.get_closest_marker("backend_independent")
        if independent is None:
            item.add_marker(pytest.mark.db)
        elif not (independent.args and isinstance(independent.args[0], str) and independent.args[0].strip()):
            raise pytest.UsageError(f"{item.nodeid}: backend_independent needs the reason the database cannot matter")
    _heaviest_files_first(items)


# A slow test (training, a server, a browser, a child process: 2 to 15 s) against an ordinary one (0.1 to 0.3 s).
SLOW_TEST_WEIGHT = 20


def _heaviest_files_first(items) -> None:
    """pytest-xdist hands whole files to its workers in the order they come (make test passes
    --no-loadscope-reorder): the heaviest first, so that neither worker is left with a long file
    at the end while the other waits. A file's weight is its tests, a slow one counting for more."""
    weight: Counter = Counter()
    for item in items:
        weight[item.path] += SLOW_TEST_WEIGHT if item.get_closest_marker("slow") else 1
    items.sort(key=lambda item: (-weight[item.path], str(item.path)))  # stable: each file's order kept


def pytest_collection_finish(session) -> None:
    """Collecting imported TensorFlow, Keras and the app: hundreds of thousands of objects that
    live as long as the process, which every full collection of Python's cycle collector walked
    again (a third of a second each, a dozen times a worker). Frozen, they are left out. Full
    collections then come after 100 younger ones instead of 10: a few a run still find the tests'
    cyclic garbage and the warnings of its finalizers (errors here) while the tests run, at less
    cost (docs/testing.md, "the fifth round")."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 100)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session) -> None:
    """A worker's reports are on their way; what pytest does next is one more full collection of
    the run's garbage (a second), for finalizers whose warnings no report would carry any more."""
    if IN_WORKER:
        gc.freeze()


def _shared_folder(tmp_path_factory) -> Path:
    """A folder all the processes of this test run share: pytest-xdist gives each worker a base
    folder of its own under the run's."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if IN_WORKER else base


@pytest.fixture(scope="session", autouse=True)
def converter_output_reused(tmp_path_factory) -> Iterator[None]:
    """The TensorFlow converter's LiteRT file of a network already converted in this test run (by
    any of its processes) is reused: the suite imports the same few test models some 150 times, at
    0.4 s of CPU each. A network with a changed layer or weight is converted anew (so are the
    tampered networks of the tests of the conversion check), and every import still checks its
    conversion against Keras on the probe batch (lite_engine.convert)."""
    from inference import lite_engine

    convert_for_real = lite_engine._tflite_bytes
    folder = _shared_folder(tmp_path_factory) / "converted"
    folder.mkdir(exist_ok=True)

    def reused(served, quantize: bool = False) -> bytes:
        # Its config names layers by a per-process counter (functional_7), so the network is known by
        # its layers' configs without their names, its weights and its outputs on a probe batch.
        layers = [{**layer.get_config(), "name": None} for layer in served.layers]
        network = hashlib.sha256(repr((layers, quantize)).encode())
        probe = lite_engine.default_probe(tuple(served.inputs[0].shape[1:]), size=2)
        outputs = served([probe] if isinstance(served.input, list) else probe, training=False)
        for array in [*served.get_weights(), *map(np.asarray, outputs)]:
            network.update(f"{array.dtype}{array.shape}".encode())
            network.update(array.tobytes())
        path = folder / f"{network.hexdigest()}.tflite"
        if not path.exists():  # written whole, then renamed: another worker never reads half a file
            model_store.atomic_write(path, convert_for_real(served, quantize))
        return path.read_bytes()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lite_engine, "_tflite_bytes", reused)
        yield


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


def _drop_everything(engine) -> None:
    """Empty a shared database (PostgreSQL): every table, whichever migration made it."""
    tables = MetaData()
    tables.reflect(engine)
    tables.drop_all(engine)


# The PostgreSQL schema where the template's rows are kept (a test's tables are in the default one).
KEPT_ROWS = "template_rows"


class SeededTemplate:
    """The database as `app` starts it: migrated to the head, the seed-like model imported as
    "seed" and active. Made once per test process and backend; `copy_to` gives a test its own copy."""

    def __init__(self, folder: Path, seed_model_file: Path, backend: str):
        self.postgresql = backend == "postgresql"
        uri = _database_uri(backend, folder)
        config = {"INSTANCE_PATH": str(folder / "instance"), "SQLALCHEMY_DATABASE_URI": uri}
        self.app = create_app({**BASE_CONFIG, **config})
        with self.app.app_context():
            if self.postgresql:
                _drop_everything(db.engine)
            model_store.init_db()
            model_store.import_model(seed_model_file, name="seed")
            db.session.remove()
            with db.engine.begin() as connection:
                if self.postgresql:
                    self._remember_rows(connection)
                else:  # the whole database in the main file, none left in the WAL, so one copy holds it
                    connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            db.engine.dispose()

    def _remember_rows(self, connection) -> None:
        """Keep a copy of every table's rows in a schema of their own, on the server, and the
        script that puts them back."""
        tables = MetaData()
        tables.reflect(connection)
        self.revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        self.tables = [table for table in tables.sorted_tables if table.name != "alembic_version"]
        connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {KEPT_ROWS} CASCADE")
        connection.exec_driver_sql(f"CREATE SCHEMA {KEPT_ROWS}")
        for table in self.tables:
            connection.exec_driver_sql(f'CREATE TABLE {KEPT_ROWS}."{table.name}" AS TABLE "{table.name}"')
        self.restore_script = ";\n".join(self._restore_statements())

    def _restore_statements(self) -> Iterator[str]:
        """DELETE, not TRUNCATE: on tables of a few rows it is several times faster (no new files,
        no exclusive locks), children before parents; then the kept rows, parents first, and each id
        sequence set to follow them (1 in an empty table: a test's rows never change the next
        test's ids; a column without a sequence has none to set: setval of NULL does nothing)."""
        for table in reversed(self.tables):
            yield f'DELETE FROM "{table.name}"'
        for table in self.tables:
            columns = ", ".join(f'"{column.name}"' for column in table.columns)
            yield f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM {KEPT_ROWS}."{table.name}"'
            for column in table.primary_key.columns:
                if column.type.python_type is int:
                    following = f'SELECT coalesce(max("{column.name}"), 0) + 1 FROM "{table.name}"'
                    sequence = f"""pg_get_serial_sequence('"{table.name}"', '{column.name}')"""
                    yield f"SELECT setval({sequence}, ({following}), false)"

    def copy_to(self, uri: str) -> None:
        """Make the database at `uri` (not yet opened by any app) a copy of the template."""
        if self.postgresql:
            with self.app.app_context():
                self._restore_rows(db.engine)
                db.engine.dispose()  # no idle connection of the template's left in a test's way
        else:
            shutil.copy(
                self.app.config["SQLALCHEMY_DATABASE_URI"].removeprefix("sqlite:///"), uri.removeprefix("sqlite:///")
            )

    def _restore_rows(self, engine) -> None:
        """Empty the tables and put the template's rows back (after a look at the schema, one
        script in one round trip). A test that left another schema (bare_app, a test of the
        migrations) has the schema made again first."""
        with engine.begin() as connection:
            listed = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            names = set(connection.execute(text(listed)).scalars())
            revision = "SELECT version_num FROM alembic_version"
            current = connection.execute(text(revision)).scalar() if "alembic_version" in names else None
        if names != {table.name for table in self.tables} | {"alembic_version"} or current != self.revision:
            _drop_everything(engine)
            model_store.init_db()
            db.session.remove()
        with engine.begin() as connection:
            # Several statements in one execute: psycopg sends a query without parameters as it is.
            connection.connection.driver_connection.execute(self.restore_script)


@pytest.fixture(scope="module")
def database_backend(request) -> str:
    """The database the test's apps use: "sqlite" (a file per test), or "postgresql" (this
    worker's database on CI's server) where pytest_generate_tests gave the test that parameter."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def seeded_templates(tmp_path_factory, seed_model_file) -> Callable[[str], SeededTemplate]:
    """The seeded template of a backend, made the first time a test asks for it. (Not a fixture
    parametrized by backend: pytest would make it again at every change of backend.)"""
    made: dict[str, SeededTemplate] = {}

    def template(backend: str) -> SeededTemplate:
        if backend not in made:
            made[backend] = SeededTemplate(tmp_path_factory.mktemp(f"template-{backend}"), seed_model_file, backend)
        return made[backend]

    return template


def _database_uri(backend: str, folder: Path) -> str:
    return POSTGRES_URL if backend == "postgresql" else f"sqlite:///{folder / 'test.sqlite'}"


@pytest.fixture
def make_app(request, tmp_path, database_backend) -> Callable[..., Flask]:
    """Build the real app on a temporary instance folder; keyword arguments override the test
    configuration. Every app of a test shares the test's database: a fresh SQLite file, or CI's
    PostgreSQL emptied; for a test that uses `app`, a copy of the seeded template instead."""
    database_uri = _database_uri(database_backend, tmp_path)
    # Prepared before the first app of the test opens the database, whichever fixture builds it.
    seeded = {"app", "make_served_app"} & set(request.fixturenames)
    if seeded:
        request.getfixturevalue("seeded_templates")(database_backend).copy_to(database_uri)
    built: list[Flask] = []

    def build(instance: str = "instance", **overrides) -> Flask:
        app = _build_app(tmp_path / instance, database_uri, **overrides)
        if database_backend == "postgresql" and not built and not seeded:
            with app.app_context():
                _drop_everything(db.engine)
        built.append(app)
        return app

    yield build
    for app in built:
        _close(app)


class _TemplatesCompiledOnce(jinja2.BytecodeCache):
    """Jinja's compiled templates kept for the whole test process. Each app has a Jinja environment
    of its own, which would compile every template it renders again (some 30 ms an app); Jinja
    checks each kept one against its template's source before it uses it."""

    def __init__(self):
        self.compiled: dict[str, bytes] = {}

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        if bucket.key in self.compiled:
            bucket.bytecode_from_string(self.compiled[bucket.key])

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        self.compiled[bucket.key] = bucket.bytecode_to_string()


TEMPLATES_COMPILED_ONCE = _TemplatesCompiledOnce()


def _build_app(instance: Path, database_uri: str, **overrides) -> Flask:
    config = {**BASE_CONFIG, "INSTANCE_PATH": str(instance), "SQLALCHEMY_DATABASE_URI": database_uri}
    app = create_app({**config, **overrides})
    app.jinja_env.bytecode_cache = TEMPLATES_COMPILED_ONCE
    return app


def _close(app: Flask) -> None:
    """Let the app's off-path rollout worker finish what the test queued (its connection would
    hold a lock the next test's emptying of the tables waits on), then close its pooled connections now, not
    when the collector finds them."""
    rollout = app.extensions.get("rollout")
    if rollout is not None:
        rollout.worker.wait_idle()
    with app.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture(scope="module")
def module_app(seeded_templates, database_backend, tmp_path_factory) -> Iterator[Flask]:
    """Like `app`, but one for all the tests of a module, for what is costly to start per test (a
    server, a browser): the seeded template copied and served once. The module's tests see each
    other's rows and settings, so each must hold whatever state the others leave; a module that
    uses it uses neither `app` nor `make_app` (on PostgreSQL they would reset its tables)."""
    folder = tmp_path_factory.mktemp("module")
    database_uri = _database_uri(database_backend, folder)
    seeded_templates(database_backend).copy_to(database_uri)
    app = _build_app(folder / "instance", database_uri)
    serve_registry(app)
    yield app
    _close(app)


@pytest.fixture
def bare_app(make_app) -> Flask:
    """The real app on an empty database (the seeded copy when the test also uses `app`)."""
    return make_app()


@pytest.fixture
def app(bare_app) -> Flask:
    """The app with its schema created by the migrations and the seed-like model imported as
    "seed" and active (make_app copied the session's template into the test's database), and
    served."""
    serve_registry(bare_app)
    return bare_app


@pytest.fixture
def make_served_app(make_app) -> Callable[..., Flask]:
    """Like `app`, with settings of the test's own: `make_served_app(RETENTION_DAYS=0)`."""

    def build(**overrides) -> Flask:
        app = make_app(**overrides)
        serve_registry(app)
        return app

    return build


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()
