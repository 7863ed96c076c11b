"""Channels' durable state per inbox (:class:`channels.base.StateStore`), in ``channel_state``."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from router.db import Database, Tx, insert_ignore
from router.models import ChannelState

__all__ = ["InboxState"]


class InboxState:
    def __init__(self, db: Database, inbox_id: int) -> None:
        self.db = db
        self.inbox_id = inbox_id

    async def load(self, key: str) -> dict[str, Any] | None:
        value = await self.db.read(
            lambda c: c.execute(
                select(ChannelState.value).where(
                    ChannelState.inbox_id == self.inbox_id, ChannelState.key == key
                )
            ).scalar_one_or_none()
        )
        return dict(value) if value is not None else None

    async def save(self, key: str, value: dict[str, Any]) -> None:
        def write(tx: Tx) -> None:
            where = (ChannelState.inbox_id == self.inbox_id, ChannelState.key == key)
            if not tx.execute(
                update(ChannelState).where(*where).values(value=value, updated_at=tx.now)
            ).rowcount:
                insert_ignore(
                    tx.conn,
                    ChannelState,
                    {"inbox_id": self.inbox_id, "key": key, "value": value, "updated_at": tx.now},
                )

        await self.db.write(write)
