"""accounts, API keys, prediction owners and feedback authors

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 04:50:00

"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=False),
        sa.Column("role", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(length=12), nullable=False),
        sa.Column("key_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key_sha256"),
    )
    op.create_index(op.f("ix_api_keys_user_id"), "api_keys", ["user_id"], unique=False)
    # Predictions made before accounts existed have no owner: only operators see them.
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner_user_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("owner_session", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("feedback_user_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("feedback_author", sa.String(length=100), nullable=True))
        batch_op.create_index(batch_op.f("ix_predictions_owner_user_id"), ["owner_user_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_predictions_owner_session"), ["owner_session"], unique=False)
        batch_op.create_foreign_key(
            "fk_predictions_owner_user_id", "users", ["owner_user_id"], ["id"], ondelete="CASCADE"
        )
        batch_op.create_foreign_key(
            "fk_predictions_feedback_user_id", "users", ["feedback_user_id"], ["id"], ondelete="SET NULL"
        )


def downgrade():
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_constraint("fk_predictions_feedback_user_id", type_="foreignkey")
        batch_op.drop_constraint("fk_predictions_owner_user_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_predictions_owner_session"))
        batch_op.drop_index(batch_op.f("ix_predictions_owner_user_id"))
        batch_op.drop_column("feedback_author")
        batch_op.drop_column("feedback_user_id")
        batch_op.drop_column("owner_session")
        batch_op.drop_column("owner_user_id")
    op.drop_index(op.f("ix_api_keys_user_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("users")
