"""rollout: champion and challenger state, its append-only event log, per-request observations

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 20:40:00

`rollout_state` is one row: the challenger (the champion stays the registry's active version),
the mode (off, shadow, canary), the canary share, the shadow sample rate, the automatic steps and
the rollback criteria, and the progress of the checks. Every worker and instance reads it on its
registry poll. `rollout_events` is append-only: every activation, start, step, promotion and
rollback with who did it, why, the state it left and a snapshot of the comparison; "which version
answered at time T" is read from it, so it keeps names and ids without foreign keys (a deleted
version's history stays). `rollout_observations` holds, per model and request, the latency and
whether the model failed: the comparison's errors and latency percentiles come from it.
"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "rollout_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("challenger_id", sa.Integer(), nullable=True),
        sa.Column("mode", sa.String(length=10), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("sample", sa.Float(), nullable=False),
        sa.Column("auto_step", sa.Boolean(), nullable=False),
        sa.Column("auto_promote", sa.Boolean(), nullable=False),
        sa.Column("criteria", sa.JSON(), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("checked_upto", sa.Integer(), nullable=False),
        sa.Column("failed_checks", sa.Integer(), nullable=False),
        sa.Column("last_check", sa.JSON(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["challenger_id"], ["model_versions.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("from_model_id", sa.Integer(), nullable=True),
        sa.Column("from_label", sa.String(length=120), nullable=True),
        sa.Column("to_model_id", sa.Integer(), nullable=True),
        sa.Column("to_label", sa.String(length=120), nullable=True),
        sa.Column("champion_id", sa.Integer(), nullable=True),
        sa.Column("champion_label", sa.String(length=120), nullable=True),
        sa.Column("challenger_id", sa.Integer(), nullable=True),
        sa.Column("challenger_label", sa.String(length=120), nullable=True),
        sa.Column("mode", sa.String(length=10), nullable=False),
        sa.Column("share", sa.Float(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("snapshot", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollout_events", schema=None) as batch_op:
        batch_op.create_index("ix_rollout_events_created_at", ["created_at"], unique=False)
    op.create_table(
        "rollout_observations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("answered", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollout_observations", schema=None) as batch_op:
        batch_op.create_index("ix_rollout_observations_created_at", ["created_at"], unique=False)
        batch_op.create_index("ix_rollout_observations_model_id", ["model_id"], unique=False)


def downgrade():
    op.drop_table("rollout_observations")
    op.drop_table("rollout_events")
    op.drop_table("rollout_state")
