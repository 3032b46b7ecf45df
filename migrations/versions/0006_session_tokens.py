"""session tokens, disabled accounts, log-in lockout; account ids never reused on SQLite

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 16:20:00

A browser session names its account by `users.session_token` (a random string, changed to end the
account's sessions) instead of its id. SQLite gives a new row the largest id plus one, so deleting
the newest account handed its id to the next one made; AUTOINCREMENT never reuses an id (the
table is rebuilt for it: migrations/env.py turns SQLite's foreign keys off while migrating, or
dropping the old table would cascade into api_keys and predictions). PostgreSQL's sequences
never reuse ids already.
"""

import secrets

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("users", sa.Column("session_token", sa.String(length=64), nullable=True))
    users = sa.table("users", sa.column("id", sa.Integer()), sa.column("session_token", sa.String()))
    connection = op.get_bind()
    for (user_id,) in connection.execute(sa.select(users.c.id)).all():
        token = secrets.token_urlsafe(32)
        connection.execute(users.update().where(users.c.id == user_id).values(session_token=token))
    # One rebuild on SQLite (the NOT NULL needs one; a second batch would make the table again
    # without AUTOINCREMENT); plain ALTERs on PostgreSQL.
    with op.batch_alter_table("users", table_kwargs={"sqlite_autoincrement": True}) as batch_op:
        batch_op.alter_column("session_token", existing_type=sa.String(length=64), nullable=False)
        batch_op.create_unique_constraint("uq_users_session_token", ["session_token"])
        batch_op.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("failed_logins", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True))
    if connection.dialect.name == "sqlite":
        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
        if broken:
            raise RuntimeError(f"rebuilding users broke foreign keys: {broken}")


def downgrade():
    with op.batch_alter_table("users", table_kwargs={"sqlite_autoincrement": False}) as batch_op:
        batch_op.drop_constraint("uq_users_session_token", type_="unique")
        batch_op.drop_column("locked_until")
        batch_op.drop_column("failed_logins")
        batch_op.drop_column("disabled_at")
        batch_op.drop_column("session_token")
