"""model_outputs: what each model answered for a recorded prediction (champion, shadow, canary)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 20:30:00

A prediction's history row keeps the answer the person saw. When a second model scores the same
decoded upload (a shadow challenger, or the champion behind a canary), its answer goes here, keyed
by prediction and model, so the comparison, the rollback checks and the label queue's
disagreement lane read one table. Rows go with their prediction (ON DELETE CASCADE), so retention
purges them too.
"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "model_outputs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("top_class", sa.String(length=100), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=True),
        sa.Column("ood_score", sa.Float(), nullable=True),
        sa.Column("probabilities", sa.JSON(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_id"], ["model_versions.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("prediction_id", "model_id", name="uq_model_outputs_prediction_model"),
    )
    with op.batch_alter_table("model_outputs", schema=None) as batch_op:
        batch_op.create_index("ix_model_outputs_prediction_id", ["prediction_id"], unique=False)
        batch_op.create_index("ix_model_outputs_model_id", ["model_id"], unique=False)
        batch_op.create_index("ix_model_outputs_created_at", ["created_at"], unique=False)


def downgrade():
    op.drop_table("model_outputs")
