"""agent connections

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 17:48:58.602390
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('agent_connections',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('agent_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('process_id', sa.String(length=128), nullable=False),
    sa.Column('connected_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['agent_id'], ['agents.id'], name=op.f('fk_agent_connections_agent_id_agents')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_agent_connections'))
    )
    with op.batch_alter_table('agent_connections', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_agent_connections_agent_id'), ['agent_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_agent_connections_process_id'), ['process_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('agent_connections', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_agent_connections_process_id'))
        batch_op.drop_index(batch_op.f('ix_agent_connections_agent_id'))

    op.drop_table('agent_connections')
