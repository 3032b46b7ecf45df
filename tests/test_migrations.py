"""Schema migrations: `init-db` creates or upgrades, and older databases keep their models."""

from alembic.script import ScriptDirectory
from flask_migrate import upgrade
from helpers import serve_registry
from sqlalchemy import inspect, text

import model_store
from database import MIGRATIONS_DIR
from model_store import ModelVersion, db


def test_upgrade_from_the_first_schema_keeps_the_models(bare_app, seed_model_file):
    with bare_app.app_context():
        upgrade(revision="0001")  # the schema before prediction history existed
        assert "predictions" not in inspect(db.engine).get_table_names()
        row = model_store.import_model(seed_model_file, name="old")
        before = (row.id, row.sha256, row.blob, row.is_active)
    result = bare_app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    with bare_app.app_context():
        assert {"predictions", "model_versions"} <= set(inspect(db.engine).get_table_names())
        row = db.session.get(ModelVersion, before[0])
        assert (row.id, row.sha256, row.blob, row.is_active) == before
    assert bare_app.test_client().get("/history").status_code == 200


def database_state() -> dict:
    """The schema (tables and columns), the Alembic revision and every model row, to compare."""
    inspector = inspect(db.engine)
    db.session.expire_all()  # read the rows again, not the session's copies
    return {
        "schema": {table: [c["name"] for c in inspector.get_columns(table)] for table in inspector.get_table_names()},
        "revision": db.session.execute(text("SELECT version_num FROM alembic_version")).scalars().all(),
        "models": [(r.id, r.sha256, r.blob, r.is_active) for r in model_store.list_models()],
    }


def test_a_database_made_before_migrations_is_stamped_and_upgraded(bare_app, seed_model_file):
    with bare_app.app_context():
        ModelVersion.__table__.create(db.engine)  # what `db.create_all()` made before Alembic
        row = model_store.import_model(seed_model_file, name="legacy")
        model_id, blob = row.id, row.blob
        model_store.init_db()
        tables = set(inspect(db.engine).get_table_names())
        assert {"alembic_version", "predictions"} <= tables
        assert db.session.get(ModelVersion, model_id).blob == blob
        upgraded = database_state()
        assert upgraded["revision"] == [ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()]
        model_store.init_db()
        assert database_state() == upgraded  # running it again changes nothing


def test_the_page_works_on_a_migrated_database(bare_app, seed_model_file):
    with bare_app.app_context():
        model_store.init_db()
        model_store.import_model(seed_model_file)
    serve_registry(bare_app)
    client = bare_app.test_client()
    assert client.get("/history").status_code == 200
    assert client.get("/healthz").status_code == 200
