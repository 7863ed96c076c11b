"""round robin index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 18:58:48.291888
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.create_index('ix_agents_presence_rr', ['presence', 'rr_position'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('agents', schema=None) as batch_op:
        batch_op.drop_index('ix_agents_presence_rr')

