"""label queue: calibrated probabilities on each prediction, rounds of label requests, second opinions

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 21:00:00

The queue ranks predictions by their calibrated margin and the feedback check compares a label
with the model's p(label), so each prediction now keeps the calibrated probabilities of the model
that made it (NULL on rows older than this column: they are left out of the queue's lanes and the
check's thresholds). A round's items say why each prediction was asked about (lane, score) and
who labelled it. A second person's label, and an operator's confirm or reject of held feedback,
are votes beside the feedback, never over it. Rounds' items and votes go with their prediction.
"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("probabilities", sa.JSON(), nullable=True))
    op.create_table(
        "label_rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("requested", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["model_versions.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "label_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("lane", sa.String(length=10), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("labelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("labelled_by", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(["round_id"], ["label_rounds.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("round_id", "prediction_id", name="uq_label_items_round_prediction"),
    )
    with op.batch_alter_table("label_items", schema=None) as batch_op:
        batch_op.create_index("ix_label_items_round_id", ["round_id"], unique=False)
        batch_op.create_index("ix_label_items_prediction_id", ["prediction_id"], unique=False)
    op.create_table(
        "label_votes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prediction_id", sa.Integer(), nullable=False),
        sa.Column("stance", sa.String(length=10), nullable=False),
        sa.Column("verdict", sa.String(length=10), nullable=False),
        sa.Column("label", sa.String(length=100), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("author", sa.String(length=100), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["prediction_id"], ["predictions.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("label_votes", schema=None) as batch_op:
        batch_op.create_index("ix_label_votes_prediction_id", ["prediction_id"], unique=False)


def downgrade():
    op.drop_table("label_votes")
    op.drop_table("label_items")
    op.drop_table("label_rounds")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_column("probabilities")
