"""Data migrations: what was stored before an upgrade keeps working after it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from sqlalchemy import Connection, select

from channels.base import InboundMessage, Sender
from channels.email_parse import message_key
from router.migrate import _run_with_connection, alembic_config, upgrade
from router.models import Inbox, Message, Quarantine
from router.pipeline import quarantine
from tests.support import make_settings, started_runtime


def downgrade(url: str, revision: str) -> None:
    def run(conn: Connection) -> None:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.downgrade(config, revision)

    _run_with_connection(url, run)


RAW = (
    b"From: Kim <kim@example.net>\r\nTo: support@example.com\r\nSubject: Hi\r\n"
    b"Message-ID: <A-1@Example.COM>\r\nDate: Wed, 25 Nov 2026 09:00:00 +0000\r\n\r\nhello\r\n"
)
OVERSIZED_HEADERS = b"From: big@example.net\r\nMessage-ID: <Big@X.org>\r\nSubject: logs\r\n\r\n"


async def test_0008_keys_stored_email_by_message_id(tmp_path: Path, db_url: str) -> None:
    """Inbound email stored under its IMAP position before 0008 gets its Message-ID key (a
    copy stored twice keeps its old id), so reading the mailbox again after the upgrade
    stores nothing twice; quarantined mail gets its key, an oversized mail's headers are
    marked partial; other channels' ids are untouched."""
    settings = make_settings(tmp_path / "conf", db_url)
    kim = Sender("email", "kim@example.net", verified=False)
    async with started_runtime(settings) as runtime:
        # as the email channel stored them before 0008: external_id = folder/UIDVALIDITY/UID
        for external_id, thread_id in (
            ("INBOX/7/1", "<A-1@Example.COM>"),
            ("INBOX/7/2", "<A-1@Example.COM>"),  # the same mail through another alias
            ("INBOX/7/3", None),  # no Message-ID
        ):
            await runtime.ingest(
                "mail", [InboundMessage(external_id, kim, "hello", thread_id=thread_id)]
            )
        await runtime.ingest(
            "sms", [InboundMessage("SM1", Sender("phone", "+4917011111111", False))]
        )
        inboxes = {
            row.slug: row.id
            for row in await runtime.db.read(lambda c: c.execute(select(Inbox)).all())
        }
        for inbox, reason, raw, data in (
            (
                "mail",
                "INBOX/7/4: 30000000 bytes is over the 25 MiB limit (headers kept; the message "
                "was not downloaded)",
                OVERSIZED_HEADERS,
                {"external_id": "INBOX/7/4"},
            ),
            ("mail", "INBOX/7/5: empty message", b"\r\n", {"external_id": "INBOX/7/5"}),
            ("sms", "text is not a string", b"{}", {"external_id": "SM9"}),
        ):
            await runtime.db.write(quarantine, inboxes[inbox], "imap", reason, raw, data)
    await asyncio.to_thread(downgrade, db_url, "0007")
    await asyncio.to_thread(upgrade, db_url)
    async with started_runtime(settings) as runtime:
        stored = await runtime.db.read(
            lambda c: (
                c.execute(
                    select(Message.external_id)
                    .where(Message.direction == "in")
                    .order_by(Message.id)
                )
                .scalars()
                .all()
            )
        )
        assert stored == ["mid:A-1@example.com", "INBOX/7/2", "INBOX/7/3", "SM1"]
        kept = await runtime.db.read(
            lambda c: c.execute(select(Quarantine).order_by(Quarantine.id)).all()
        )
        assert [(q.external_id, q.data) for q in kept] == [
            ("mid:Big@x.org", {"external_id": "mid:Big@x.org", "partial": True}),
            (None, {"external_id": "INBOX/7/5"}),
            ("SM9", {"external_id": "SM9"}),
        ]
        # the mailbox read again after the upgrade: the channel's key finds the stored mail
        key = message_key(RAW)
        [outcome] = await runtime.ingest(
            "mail",
            [InboundMessage(key.external_id, kim, "hello", fingerprint=key.fingerprint)],
        )
        assert outcome.duplicate
