"""Revocation: a console session remembers how it signed in (password | token; ``unknown``
for the sessions opened before) and why it ended; an agent's socket remembers the console
session it signed in with (NULL: the API token).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 23:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "signed_in_with", sa.String(length=16), server_default="unknown", nullable=False
            )
        )
        batch_op.add_column(sa.Column("end_reason", sa.String(length=32), nullable=True))
    with op.batch_alter_table("agent_connections", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_id", _ID, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("agent_connections", schema=None) as batch_op:
        batch_op.drop_column("session_id")
    with op.batch_alter_table("user_sessions", schema=None) as batch_op:
        batch_op.drop_column("end_reason")
        batch_op.drop_column("signed_in_with")
