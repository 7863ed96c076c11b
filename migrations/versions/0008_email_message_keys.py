"""Email dedupe by Message-ID: inbound email messages are keyed ``mid:<Message-ID>``
instead of ``<folder>/<UIDVALIDITY>/<UID>``, and quarantined items carry their dedupe key.

Messages stored before keep deduplicating after the upgrade: each inbound email message with
a Message-ID gets ``mid:<normalized Message-ID>`` as its external_id (the first one per
inbox and key; a copy stored twice before keeps its old id). Quarantined mail gets the key
of the Message-ID in its raw headers; an oversized mail's quarantined headers are marked
``partial`` (re-importing them would lose the body). Mail without a Message-ID stored
before keeps its old id (its content hash needs the raw bytes, which are not kept).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 10:00:00
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
_BATCH = 1000
_MAX_KEY = 400
_MSGID = re.compile(r"<[^<>\s]+>")
_HEADER_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.I | re.M)
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_OVERSIZED = "MiB limit (headers kept"

# A frozen copy of channels.email_parse.normalize_message_id and message_key's Message-ID
# rule as they were when this revision was written (a migration never imports app code).


def _key(message_id: str) -> str:
    value = "".join(message_id.split()).strip("<>")
    left, at, right = value.rpartition("@")
    key = f"{left}{at}{right.lower()}" if at else value
    if len(key) > _MAX_KEY:
        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    return f"mid:{key}"


def _raw_message_id(raw: bytes) -> str | None:
    end = _HEADER_END.search(raw)
    head = raw[: end.start()] if end else raw
    found = _HEADER_MESSAGE_ID.search(head)
    if found is None:
        return None
    value = re.sub(r"\r?\n", "", found.group(1).decode("utf-8", "replace"))
    msgid = _MSGID.search(value)
    return msgid.group(0) if msgid else None


def upgrade() -> None:
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.add_column(sa.Column("external_id", sa.String(length=512), nullable=True))
        batch_op.create_index("ix_quarantine_external", ["inbox_id", "external_id"], unique=False)
    conn = op.get_bind()
    inboxes = sa.table("inboxes", sa.column("id", _ID), sa.column("channel", sa.String))
    email_inboxes = [
        int(i)
        for i in conn.execute(
            sa.select(inboxes.c.id).where(inboxes.c.channel == "email")
        ).scalars()
    ]
    if email_inboxes:
        _rekey_messages(conn, email_inboxes)
    _key_quarantine(conn, set(email_inboxes))


def _rekey_messages(conn: sa.Connection, email_inboxes: list[int]) -> None:
    messages = sa.table(
        "messages",
        sa.column("id", _ID),
        sa.column("inbox_id", _ID),
        sa.column("direction", sa.String),
        sa.column("external_id", sa.String),
        sa.column("thread_id", sa.String),
    )
    taken = (
        sa.select(messages.c.id)
        .where(
            messages.c.inbox_id == sa.bindparam("inbox"),
            messages.c.external_id == sa.bindparam("key"),
        )
        .limit(1)
    )
    last = 0
    while True:
        rows = conn.execute(
            sa.select(messages.c.id, messages.c.inbox_id, messages.c.external_id, messages.c.thread_id)
            .where(
                messages.c.id > last,
                messages.c.inbox_id.in_(email_inboxes),
                messages.c.direction == "in",
                messages.c.thread_id.is_not(None),
            )
            .order_by(messages.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        for row in rows:
            if str(row.external_id or "").startswith("mid:"):
                continue
            key = _key(row.thread_id)
            if conn.execute(taken, {"inbox": row.inbox_id, "key": key}).first() is None:
                conn.execute(
                    messages.update().where(messages.c.id == row.id).values(external_id=key)
                )
        last = int(rows[-1].id)


def _key_quarantine(conn: sa.Connection, email_inboxes: set[int]) -> None:
    quarantine = sa.table(
        "quarantine",
        sa.column("id", _ID),
        sa.column("inbox_id", _ID),
        sa.column("reason", sa.Text),
        sa.column("raw", sa.LargeBinary),
        sa.column("data", _JSON),
        sa.column("external_id", sa.String),
    )
    last = 0
    while True:
        rows = conn.execute(
            sa.select(quarantine)
            .where(quarantine.c.id > last)
            .order_by(quarantine.c.id)
            .limit(_BATCH)
        ).all()
        if not rows:
            return
        for row in rows:
            data = dict(row.data or {})
            key = data.get("external_id")
            if row.inbox_id in email_inboxes:
                # the old external_id was a mailbox position, not a key
                message_id = _raw_message_id(bytes(row.raw or b""))
                key = _key(message_id) if message_id else None
                if key is not None:
                    data["external_id"] = key
                if _OVERSIZED in (row.reason or ""):
                    data["partial"] = True
            if key is not None or data != (row.data or {}):
                conn.execute(
                    quarantine.update()
                    .where(quarantine.c.id == row.id)
                    .values(external_id=key, data=data)
                )
        last = int(rows[-1].id)


def downgrade() -> None:
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.drop_index("ix_quarantine_external")
        batch_op.drop_column("external_id")
