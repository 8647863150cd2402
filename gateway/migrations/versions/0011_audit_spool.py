"""audit_spool: AuditEvents captured on the request path, stored as resources when there is time

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 06:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_spool",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("event", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_spool")
