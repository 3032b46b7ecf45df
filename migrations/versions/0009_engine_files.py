"""engine_files: each model file converted for the serving engine (LiteRT), keyed by its sha256

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 21:00:00

The import sandbox converts every model it stores to the lean engine's format (a LiteRT file that
also answers the OOD features and the explained feature map); the conversion is stored here beside
the model, linked by the stored model file's sha256, with the metadata the engine needs (JSON). A
web worker serves this file without TensorFlow. Versions stored before this revision have none:
`flask models upgrade-files` converts them once, in the sandbox (it needs TensorFlow, not a
migration).
"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "engine_files",
        sa.Column("model_sha256", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=20), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_sha256"),
    )


def downgrade():
    op.drop_table("engine_files")
