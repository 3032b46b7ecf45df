"""drift monitoring: each model's drift reference, per-prediction drift samples, closed windows

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 21:00:00

A model's reference (fitted beside its calibration on the same held-out images) is a safetensors
BLOB keyed by model. Each recorded prediction keeps a few floats for drift (class, calibrated top
probability, decision, OOD score, image statistics, PCA coordinates) that go with the prediction
(ON DELETE CASCADE) when retention purges it; the closed windows' test results stay.
"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "drift_references",
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id"),
    )
    op.create_table(
        "drift_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("class_index", sa.Integer(), nullable=False),
        sa.Column("top_probability", sa.Float(), nullable=False),
        sa.Column("decision", sa.String(length=10), nullable=True),
        sa.Column("ood_score", sa.Float(), nullable=True),
        sa.Column("brightness_mean", sa.Float(), nullable=False),
        sa.Column("brightness_std", sa.Float(), nullable=False),
        sa.Column("saturation_mean", sa.Float(), nullable=False),
        sa.Column("sharpness", sa.Float(), nullable=False),
        sa.Column("embedding", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["model_id"], ["model_versions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_drift_samples_prediction_id", "drift_samples", ["prediction_id"])
    op.create_index("ix_drift_samples_model_id", "drift_samples", ["model_id"])
    op.create_index("ix_drift_samples_created_at", "drift_samples", ["created_at"])
    op.create_table(
        "drift_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("key", sa.String(length=40), nullable=False),
        sa.Column("start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_sample_id", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("estimated_accuracy", sa.Float(), nullable=False),
        sa.Column("accuracy_se", sa.Float(), nullable=False),
        sa.Column("reference_accuracy", sa.Float(), nullable=False),
        sa.Column("unknown_rate", sa.Float(), nullable=False),
        sa.Column("min_p_value", sa.Float(), nullable=False),
        sa.Column("alerts", sa.JSON(), nullable=False),
        sa.Column("tests", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["model_versions.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id", "kind", "key", name="uq_drift_windows_model_kind_key"),
    )
    op.create_index("ix_drift_windows_model_id", "drift_windows", ["model_id"])
    op.create_index("ix_drift_windows_start", "drift_windows", ["start"])


def downgrade():
    op.drop_table("drift_windows")
    op.drop_table("drift_samples")
    op.drop_table("drift_references")
