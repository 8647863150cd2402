"""The operator console: staff roles, per-minute metric sums, message notes and ACK latency,
client names and disabling

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 08:50:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "staff_role",
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "role"),
    )
    op.create_table(
        "metric_rollup",
        sa.Column("minute_ms", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("peak", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("minute_ms", "name", "label"),
    )
    with op.batch_alter_table("hl7_message") as batch:
        batch.add_column(sa.Column("ack_ms", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))
    op.create_index("ix_hl7_sender", "hl7_message", ["sending_app", "id"])
    op.create_index("ix_hl7_type", "hl7_message", ["message_type", "id"])
    with op.batch_alter_table("oauth_client") as batch:
        batch.add_column(sa.Column("name", sa.String(255), nullable=True))
        batch.add_column(sa.Column("disabled_ms", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("oauth_client") as batch:
        batch.drop_column("disabled_ms")
        batch.drop_column("name")
    op.drop_index("ix_hl7_type", "hl7_message")
    op.drop_index("ix_hl7_sender", "hl7_message")
    with op.batch_alter_table("hl7_message") as batch:
        batch.drop_column("note")
        batch.drop_column("ack_ms")
    op.drop_table("metric_rollup")
    op.drop_table("staff_role")
