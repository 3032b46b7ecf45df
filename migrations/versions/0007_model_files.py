"""calibration OOD arrays as a BLOB beside the small JSON record; metrics under one key set

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 17:00:00

Each calibration record kept its OOD class means and precision matrices inline as JSON (4.5 MB
for the shipped model), parsed on every model-card view. They move to `model_calibrations.stats`
(safetensors, calibration.split_record); the JSON keeps the rest. Each model's metrics get the
documented key names (metrics_schema.normalise). `model_versions.format` widens to 20 characters
for "safetensors". Model files themselves are converted by
`flask models upgrade-files` (it needs the import sandbox and TensorFlow, not a migration).
"""

import sqlalchemy as sa
from alembic import op

from inference import calibration, ood
from registry import metrics_schema

# revision identifiers, used by Alembic.
revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

calibrations = sa.table(
    "model_calibrations",
    sa.column("model_id", sa.Integer()),
    sa.column("record", sa.JSON()),
    sa.column("stats", sa.LargeBinary()),
)
models = sa.table("model_versions", sa.column("id", sa.Integer()), sa.column("metrics", sa.JSON()))


def upgrade():
    _set_format_length(10, 20)  # "safetensors" is 11 characters
    with op.batch_alter_table("model_calibrations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stats", sa.LargeBinary(), nullable=True))
    connection = op.get_bind()
    for model_id, record in connection.execute(sa.select(calibrations.c.model_id, calibrations.c.record)).all():
        small, stats = calibration.split_record(record)
        connection.execute(
            calibrations.update().where(calibrations.c.model_id == model_id).values(record=small, stats=stats)
        )
    for model_id, metrics in connection.execute(sa.select(models.c.id, models.c.metrics)).all():
        normalised = metrics_schema.normalise(metrics or {})
        if normalised != metrics:
            connection.execute(models.update().where(models.c.id == model_id).values(metrics=normalised))


def downgrade():
    # Metric names stay documented ones: the older code shows them as missing, nothing breaks.
    connection = op.get_bind()
    rows = connection.execute(sa.select(calibrations.c.model_id, calibrations.c.record, calibrations.c.stats)).all()
    for model_id, record, stats in rows:
        whole = calibration.join_record(record, stats)
        if whole.get("ood"):
            whole = {**whole, "ood": {**whole["ood"], **_as_lists(whole["ood"])}}
        connection.execute(calibrations.update().where(calibrations.c.model_id == model_id).values(record=whole))
    with op.batch_alter_table("model_calibrations", schema=None) as batch_op:
        batch_op.drop_column("stats")
    _set_format_length(20, 10)


def _set_format_length(old: int, new: int) -> None:
    # SQLite does not enforce VARCHAR lengths, and its batch mode copies and drops model_versions,
    # which with foreign keys on would cascade-delete every calibration and prediction row.
    if op.get_bind().dialect.name == "sqlite":
        return
    op.alter_column("model_versions", "format", existing_type=sa.String(old), type_=sa.String(new), nullable=False)


def _as_lists(record: dict) -> dict:
    return {key: [value.tolist() for value in record[key]] for key in ood.ARRAY_KEYS}
