"""hl7_message.truncated_from_bytes: a message over the maximum size is stored by its first segments

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 06:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("hl7_message") as batch:
        batch.add_column(sa.Column("truncated_from_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("hl7_message") as batch:
        batch.drop_column("truncated_from_bytes")
