"""OOD threshold changes: the label queue's labels tune a model's "none of these" threshold

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 22:00:00

`flask label-queue tune-ood --apply` writes the threshold the labels support into the model's
calibration record; each change is logged here: the model, the calibration time it gave, who,
the old and new threshold, how many labels, and when the OOD statistics the labelled scores were
computed with were fitted (a threshold change keeps them; only such scores count as evidence).
The log goes with its model.
"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "ood_threshold_changes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("author", sa.String(length=100), nullable=False),
        sa.Column("old_threshold", sa.Float(), nullable=False),
        sa.Column("new_threshold", sa.Float(), nullable=False),
        sa.Column("in_scope_labels", sa.Integer(), nullable=False),
        sa.Column("none_labels", sa.Integer(), nullable=False),
        sa.Column("scores_since", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ood_threshold_changes", schema=None) as batch_op:
        batch_op.create_index("ix_ood_threshold_changes_model_id", ["model_id"], unique=False)


def downgrade():
    op.drop_table("ood_threshold_changes")
