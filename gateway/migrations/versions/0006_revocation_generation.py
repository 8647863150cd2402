"""revocation generation: the counter every process checks before reusing a cached token

Revision ID: 0006
Revises: 0005

(Re-chained after the portal's 0005 at merge.)
Create Date: 2026-12-02 10:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table('revocation_generation',
    sa.Column('id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('generation', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.bulk_insert(table, [{'id': 1, 'generation': 0}])


def downgrade() -> None:
    op.drop_table('revocation_generation')
