"""calibration: a table of model calibrations; each prediction's decision and OOD score

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 05:00:00

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "model_calibrations",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id"),
    )
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decision", sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column("ood_score", sa.Float(), nullable=True))
        batch_op.create_index(batch_op.f("ix_predictions_decision"), ["decision"], unique=False)


def downgrade():
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_predictions_decision"))
        batch_op.drop_column("ood_score")
        batch_op.drop_column("decision")
    op.drop_table("model_calibrations")
