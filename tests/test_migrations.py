"""Schema migrations: `init-db` creates or upgrades, and older databases keep their models."""

from datetime import UTC, datetime

import numpy as np
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from flask_migrate import downgrade, upgrade
from helpers import CIFAR10, serve_registry
from sqlalchemy import inspect, text

import engine_store
import model_store
from database import MIGRATIONS_DIR
from inference import calibration
from model_store import ModelVersion, db


def stored_as_first_schema(path, name: str, metrics: dict | None = None) -> ModelVersion:
    """A registry row as the first schema's code stored it: the imported .h5 as it was."""
    data = path.read_bytes()
    row = ModelVersion(
        name=name,
        version=1,
        filename=path.name,
        format="h5",
        blob=data,
        size=len(data),
        sha256=model_store.sha256_of(data),
        class_names=CIFAR10,
        input_shape=[32, 32, 3],
        input_scale="unit",
        output_kind="logits",
        tta="none",
        metrics=metrics or {},
        created_at=datetime.now(UTC),
        is_active=True,
    )
    db.session.add(row)
    db.session.commit()
    return row


def test_upgrade_from_the_first_schema_keeps_the_models(bare_app, seed_model_file):
    with bare_app.app_context():
        upgrade(revision="0001")  # the schema before prediction history existed
        assert "predictions" not in inspect(db.engine).get_table_names()
        row = stored_as_first_schema(seed_model_file, "old")
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


def test_a_database_made_before_migrations_is_stamped_and_upgraded(bare_app, seed_model_file, monkeypatch):
    # That registry had no conversions: none to store, none to look up.
    monkeypatch.setattr(engine_store, "put", lambda *args: None)
    monkeypatch.setattr(engine_store, "get", lambda *args: None)
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


def test_0007_moves_calibration_arrays_to_a_blob_and_maps_old_metric_keys(bare_app, seed_model_file):
    rng = np.random.default_rng(0)
    ood = {"layers": ["conv"], "means": [rng.random((10, 4)).tolist()], "precisions": [rng.random((4, 4)).tolist()]}
    record = {"temperature": 1.2, "ood": {**ood, "threshold": 2.0}}
    calibrations = sa.table(
        "model_calibrations",
        sa.column("model_id", sa.Integer()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("summary", sa.JSON()),
        sa.column("record", sa.JSON()),
    )
    with bare_app.app_context():
        upgrade(revision="0005")
        model_id = stored_as_first_schema(seed_model_file, "old", {"seed": 3, "batch_size": 64}).id
        with db.engine.begin() as connection:
            values = {"model_id": model_id, "created_at": datetime.now(UTC), "summary": {}, "record": record}
            connection.execute(calibrations.insert().values(**values))
        db.session.close()  # no open transaction holding a lock on the tables the migration alters
        upgrade(revision="0007")
        small = model_store.get_calibration(model_id)
        assert "means" not in small["ood"] and small["ood"]["threshold"] == 2.0
        whole = model_store.get_full_calibration(model_id)
        np.testing.assert_allclose(whole["ood"]["precisions"][0], ood["precisions"][0], rtol=1e-6)
        assert db.session.get(ModelVersion, model_id).metrics == {"random_seed": 3, "recipe": {"batch_size": 64}}
        db.session.close()
        downgrade(revision="0005")
        back = db.session.execute(sa.select(calibrations.c.record)).scalar_one()
        assert calibration.join_record(back, None)["ood"]["means"][0] == np.float32(ood["means"][0]).tolist()


def test_the_migrations_build_the_schema_the_models_declare(app):
    """Every table, column, index and foreign key the ORM declares is what `init-db` built: a
    model changed without its migration (or the reverse) fails here, on SQLite and PostgreSQL."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with app.app_context(), db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        differences = compare_metadata(context, db.metadata)
    assert differences == []
