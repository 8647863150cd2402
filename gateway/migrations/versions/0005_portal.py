"""patient portal: opened results/messages, notification preferences and queue, sign-out everywhere

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 06:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('portal_seen',
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('reference', sa.String(length=200), nullable=False),
    sa.Column('seen_ms', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('user_id', 'reference')
    )
    op.create_table('portal_preference',
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('channel', sa.String(length=8), nullable=False),
    sa.PrimaryKeyConstraint('user_id', 'event')
    )
    op.create_table('portal_notification',
    sa.Column('id', ID, autoincrement=True, nullable=False),
    sa.Column('user_id', sa.BigInteger(), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('event', sa.String(length=32), nullable=False),
    sa.Column('channel', sa.String(length=8), nullable=False),
    sa.Column('address', sa.String(length=255), nullable=False),
    sa.Column('dedup_key', sa.String(length=255), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_ms', sa.BigInteger(), nullable=False),
    sa.Column('created_ms', sa.BigInteger(), nullable=False),
    sa.Column('sent_ms', sa.BigInteger(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('dedup_key')
    )
    with op.batch_alter_table('portal_notification', schema=None) as batch_op:
        batch_op.create_index('ix_portal_notification_due', ['status', 'next_attempt_ms'], unique=False)
    with op.batch_alter_table('auth_user', schema=None) as batch_op:
        batch_op.add_column(sa.Column('session_epoch', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('auth_user', schema=None) as batch_op:
        batch_op.drop_column('session_epoch')
    with op.batch_alter_table('portal_notification', schema=None) as batch_op:
        batch_op.drop_index('ix_portal_notification_due')
    op.drop_table('portal_notification')
    op.drop_table('portal_preference')
    op.drop_table('portal_seen')
