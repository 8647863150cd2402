"""Drop the `_id` token rows: `_id` is searched on resource.id, never through the index

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 06:20:00

Every resource had a token row for `_id` that no search read (search.py matches `_id` against the
resource table's own unique (type, id) index). The store no longer writes them
(indexer.FROM_RESOURCE_TABLE); this removes those already stored. Downgrading writes nothing back:
the rows were never read.
"""

from alembic import op
import sqlalchemy as sa


revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    sp_token = sa.table("sp_token", sa.column("param"))
    op.get_bind().execute(sp_token.delete().where(sp_token.c.param == "_id"))


def downgrade() -> None:
    pass
