"""Queue order by SLA due time in one index walk; channel state (email poller cursors);
messages.thread_id (email Message-IDs, for threading replies)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25 20:55:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
NO_DUE = datetime(9999, 12, 31, tzinfo=UTC)  # router.assignment.sla.NO_DUE


def upgrade() -> None:
    op.create_table(
        "channel_state",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("inbox_id", _ID, nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("value", _JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["inbox_id"], ["inboxes.id"], name=op.f("fk_channel_state_inbox_id_inboxes")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channel_state")),
        sa.UniqueConstraint("inbox_id", "key", name=op.f("uq_channel_state_inbox_id_key")),
    )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.add_column(sa.Column("thread_id", sa.String(length=998), nullable=True))
        batch_op.create_index("ix_messages_thread", ["inbox_id", "thread_id"], unique=False)
    # "No SLA running" is a far-future due time, never NULL: the queue order is one index walk
    sqlite = op.get_bind().dialect.name == "sqlite"
    conversations = sa.table("conversations", sa.column("sla_due_at", sa.DateTime(timezone=True)))
    op.execute(
        conversations.update()
        .where(conversations.c.sla_due_at.is_(None))
        .values(sla_due_at=NO_DUE.replace(tzinfo=None) if sqlite else NO_DUE)
    )
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_waiting")
        batch_op.create_index(
            "ix_conversations_queue_order",
            ["state", sa.text("priority DESC"), "sla_due_at", "queued_at", "id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("conversations", schema=None) as batch_op:
        batch_op.drop_index("ix_conversations_queue_order")
        batch_op.create_index(
            "ix_conversations_waiting", ["state", "priority", "queued_at"], unique=False
        )
    with op.batch_alter_table("messages", schema=None) as batch_op:
        batch_op.drop_index("ix_messages_thread")
        batch_op.drop_column("thread_id")
    op.drop_table("channel_state")
