"""SLA clocks, overflow steps and stored timers

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 19:50:42.215966
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('timers',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('conversation_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['conversation_id'], ['conversations.id'], name=op.f('fk_timers_conversation_id_conversations')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_timers')),
    sa.UniqueConstraint('conversation_id', 'kind', name=op.f('uq_timers_conversation_id_kind'))
    )
    with op.batch_alter_table('timers', schema=None) as batch_op:
        batch_op.create_index('ix_timers_due', ['due_at'], unique=False)

    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('queue_entered_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('overflow_step', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('sla_first_response_due_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('sla_resolution_due_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('sla_resolution_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('sla_resolution_used_s', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('sla_due_at', sa.DateTime(timezone=True), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('conversations', schema=None) as batch_op:
        batch_op.drop_column('sla_due_at')
        batch_op.drop_column('sla_resolution_used_s')
        batch_op.drop_column('sla_resolution_since')
        batch_op.drop_column('sla_resolution_due_at')
        batch_op.drop_column('sla_first_response_due_at')
        batch_op.drop_column('overflow_step')
        batch_op.drop_column('queue_entered_at')

    with op.batch_alter_table('timers', schema=None) as batch_op:
        batch_op.drop_index('ix_timers_due')

    op.drop_table('timers')
