"""class names stored on each prediction

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 05:00:00

Feedback is checked against the classes of the model that made the prediction; the names are
stored on the row so the check holds after that model is deleted. Existing rows get the names of
their model where it still exists; rows whose model is gone keep NULL (feedback naming a class
is then refused, since nothing says which classes that model had).
"""

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("class_names", sa.JSON(), nullable=True))
    op.execute(
        "UPDATE predictions SET class_names = "
        "(SELECT model_versions.class_names FROM model_versions WHERE model_versions.id = predictions.model_id)"
    )


def downgrade():
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_column("class_names")
