"""The active ruleset, per process, with the database as the source of truth.

- ``rulesets`` rows are activations (version = sha256 of the bytes, the YAML text, source
  file | api, when and by whom); the newest row is the active ruleset.
- The file is imported only when its sha256 differs from the last *file* import (never
  merely on start-up), and only by the holder of the ``rules-watch`` lease; so an API
  ``PUT`` stays active until the file's content changes.
- Import or ``PUT`` validates, inserts and activates in one transaction, mirrors the
  queues and their members, and refuses a ruleset that removes a queue still holding open
  conversations. A bad file never replaces a good one; its errors are kept for
  ``GET /api/admin/rules``.
- Every process switches within seconds: a bus notice, with a database poll as fallback.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from adapters.bus import Bus
from router.db import Database, Tx, insert_ignore
from router.exceptions import RulesRejected
from router.leases import try_acquire
from router.models import Conversation, Process, Queue, QueueMember
from router.models import Ruleset as RulesetRow
from router.tasks import periodic
from router.types import CHANNEL_IDS, OPEN_STATES
from routing_rules import LocatedError, RulesError, Ruleset, format_duration, load_ruleset

__all__ = ["RulesService", "activate", "queue_spec"]

log = logging.getLogger(__name__)
TOPIC = "rules"


def queue_spec(ruleset: Ruleset, name: str) -> dict[str, Any]:
    """A JSON summary of a queue's settings for the runtime mirror and the API."""
    q = ruleset.queues[name]
    return {
        "skills": q.skills,
        "strategy": q.strategy,
        "offer_timeout": format_duration(q.offer_timeout),
        "hours": q.hours,
        "sla": {str(k): format_duration(v) for k, v in asdict(q.sla).items() if v is not None},
        "members": list(q.members) if q.members is not None else None,
        "language_required": q.language_required,
        "auto_accept": q.auto_accept,
        "escalate_to": q.escalate_to,
    }


def _open_counts(conn: Connection, queues: list[str]) -> dict[str, int]:
    if not queues:
        return {}
    rows = conn.execute(
        select(Conversation.queue, func.count())
        .where(
            Conversation.queue.in_(queues), Conversation.state.in_([s.value for s in OPEN_STATES])
        )
        .group_by(Conversation.queue)
    ).all()
    return {str(r[0]): int(r[1]) for r in rows}


def activate(tx: Tx, ruleset: Ruleset, source: str, path: str | None, by: str) -> int:
    """Insert and activate ``ruleset`` in the caller's transaction; mirror its queues."""
    current = set(tx.execute(select(Queue.name).where(Queue.active.is_(True))).scalars())
    removed = sorted(current - set(ruleset.queues))
    busy = _open_counts(tx.conn, removed)
    if busy:
        detail = ", ".join(
            f'"{q}" ({n} open conversation{"s" if n != 1 else ""})' for q, n in sorted(busy.items())
        )
        raise RulesRejected(
            f"the ruleset removes queues that still hold open conversations: {detail}", queues=busy
        )
    row_id = int(
        tx.execute(
            insert(RulesetRow)
            .values(
                version=ruleset.version,
                text=ruleset.text,
                source=source,
                source_path=path,
                activated_at=tx.now,
                activated_by=by,
            )
            .returning(RulesetRow.id)
        ).scalar_one()
    )
    tx.execute(update(Queue).where(Queue.name.not_in(list(ruleset.queues))).values(active=False))
    for name in ruleset.queues:
        values = {
            "active": True,
            "ruleset_version": ruleset.version,
            "spec": queue_spec(ruleset, name),
        }
        if not tx.execute(update(Queue).where(Queue.name == name).values(**values)).rowcount:
            insert_ignore(tx.conn, Queue, {"name": name, "rr_cursor": 0, **values})
    tx.execute(delete(QueueMember))
    members = [
        {"queue": name, "user_name": user}
        for name, q in ruleset.queues.items()
        for user in (q.members or ())
    ]
    if members:
        tx.execute(insert(QueueMember), members)
    return row_id


def _latest(conn: Connection) -> tuple[int, str, str] | None:
    row = conn.execute(
        select(RulesetRow.id, RulesetRow.version, RulesetRow.text)
        .order_by(RulesetRow.id.desc())
        .limit(1)
    ).first()
    return (int(row.id), row.version, row.text) if row else None


def _last_file_version(conn: Connection) -> str | None:
    return conn.execute(
        select(RulesetRow.version)
        .where(RulesetRow.source == "file")
        .order_by(RulesetRow.id.desc())
        .limit(1)
    ).scalar_one_or_none()


@dataclass
class LoadReport:
    at: str
    source: str
    version: str | None
    errors: list[dict[str, Any]] = field(default_factory=list)


class RulesService:
    def __init__(
        self, db: Database, bus: Bus, *, rules_path: Path, process_id: str, lease_ttl: float
    ) -> None:
        self.db = db
        self.bus = bus
        self.rules_path = rules_path
        self.process_id = process_id
        self.lease_ttl = lease_ttl
        self.active: Ruleset | None = None
        self.active_id: int | None = None
        self.last_report: LoadReport | None = None
        self.listeners: list[Callable[[Ruleset], None]] = []
        self._refresh_lock = asyncio.Lock()
        self._subscription: Any = None
        # The version of the file last rejected: while the file keeps it, it is not read,
        # logged or reported again (the watch looks every few seconds).
        self.rejected: str | None = None

    @property
    def ruleset(self) -> Ruleset:
        if self.active is None:
            raise RuntimeError("no active ruleset")
        return self.active

    async def start(self) -> None:
        self._subscription = self.bus.subscribe(TOPIC, lambda _msg: self._spawn_refresh())
        await self.bus.ready(TOPIC)
        await self.refresh()
        # Import the file only if its content differs from the last file import (so an API
        # activation survives restarts), and only as the holder of the rules-watch lease.
        if await self.db.write(try_acquire, "rules-watch", self.process_id, self.lease_ttl):
            await self.import_file(initial=True)

    async def stop(self) -> None:
        if self._subscription is not None:
            self._subscription.close()

    def _spawn_refresh(self) -> None:
        from router.tasks import spawn

        spawn(self.refresh(), "rules-refresh")

    async def refresh(self) -> bool:
        """Load the newest activation if it is not the one this process routes with."""
        async with self._refresh_lock:
            latest = await self.db.read(_latest)
            if latest is None or latest[0] == self.active_id:
                return False
            row_id, version, text = latest
            try:
                ruleset = load_ruleset(
                    text.encode("utf-8"), f"ruleset #{row_id}", channels=CHANNEL_IDS
                )
            except RulesError:  # cannot happen for a validated row; keep routing with what we have
                log.exception(
                    "stored ruleset #%s does not load; keeping %s", row_id, self.active_id
                )
                return False
            ruleset.engine  # noqa: B018  (built now, not by the first routing after it)
            self.active, self.active_id = ruleset, row_id
            log.info("routing with ruleset %s (#%s)", version, row_id)
            for listener in self.listeners:
                listener(ruleset)
            await self.db.write(_record_version, self.process_id, version)
            return True

    async def import_file(self, *, initial: bool = False) -> LoadReport | None:
        """Import rules.yaml if its content differs from the last file import."""
        try:
            data = self.rules_path.read_bytes()
        except OSError as exc:
            if initial and self.active is None:
                log.error("cannot read the rules file %s: %s", self.rules_path, exc.strerror)
            return None
        version = "sha256:" + hashlib.sha256(data).hexdigest()
        if version == self.rejected:
            return None  # still the same bad file: said once already
        from datetime import UTC, datetime

        if version == await self.db.read(_last_file_version):
            if self.rejected is not None or (self.last_report and self.last_report.errors):
                # reverted to the content already imported: the earlier errors are over
                self.rejected = None
                self.last_report = LoadReport(
                    datetime.now(UTC).isoformat(), str(self.rules_path), version
                )
                await self.db.write(_record_error, self.process_id, {})
                log.info(
                    "rules file %s matches the last imported ruleset (%s) again: its errors"
                    " are cleared",
                    self.rules_path,
                    version,
                )
            return None
        report = LoadReport(datetime.now(UTC).isoformat(), str(self.rules_path), version)
        try:
            ruleset = load_ruleset(data, str(self.rules_path), channels=CHANNEL_IDS)
            await self.db.write(
                activate, ruleset, "file", str(self.rules_path), f"file:{self.process_id}"
            )
        except RulesError as exc:
            report.errors = [e.to_dict() for e in exc.errors]
            log.error(
                "rules file %s rejected; still routing with the active ruleset:\n%s",
                self.rules_path,
                exc,
            )
        except RulesRejected as exc:
            report.errors = [{"line": 1, "col": 1, "where": "queues", "message": exc.message}]
            log.error("rules file %s rejected: %s", self.rules_path, exc.message)
        self.last_report = report
        self.rejected = version if report.errors else None
        await self.db.write(_record_error, self.process_id, asdict(report) if report.errors else {})
        if not report.errors:
            await self.refresh()
            await self.bus.publish(TOPIC, {"version": version})
        return report

    async def put(self, data: bytes, by: str) -> Ruleset:
        """Validate and activate a ruleset sent through the API (raises with located errors)."""
        try:
            ruleset = load_ruleset(data, "rules.yaml", channels=CHANNEL_IDS)
        except RulesError as exc:
            raise RulesRejected(
                "the ruleset has errors", errors=[e.to_dict() for e in exc.errors]
            ) from None
        await self.db.write(activate, ruleset, "api", None, by)
        await self.refresh()
        await self.bus.publish(TOPIC, {"version": ruleset.version})
        return ruleset

    async def watch(self, interval: float) -> None:
        """The ``rules-watch`` lease holder imports the file when its content changes."""

        async def step() -> None:
            if await self.db.write(try_acquire, "rules-watch", self.process_id, self.lease_ttl):
                await self.import_file()

        await periodic(step, interval, "rules watch")

    async def poll(self, interval: float) -> None:
        """Fallback to the bus notice: notice a new activation within ``interval`` seconds."""
        await periodic(self.refresh, interval, "rules poll", first_delay=interval)

    async def status(self) -> dict[str, Any]:
        def load(conn: Connection) -> dict[str, Any]:
            latest = conn.execute(
                select(RulesetRow).order_by(RulesetRow.id.desc()).limit(1)
            ).first()
            processes = conn.execute(select(Process).order_by(Process.id)).all()
            return {
                "active": None
                if latest is None
                else {
                    "id": latest.id,
                    "version": latest.version,
                    "source": latest.source,
                    "path": latest.source_path,
                    "activated_at": latest.activated_at.isoformat(),
                    "activated_by": latest.activated_by,
                },
                "processes": [
                    {
                        "id": p.id,
                        "host": p.host,
                        "pid": p.pid,
                        "ruleset_version": p.ruleset_version,
                        "heartbeat_at": p.heartbeat_at.isoformat(),
                        "last_error": p.last_error or None,
                    }
                    for p in processes
                ],
            }

        status = await self.db.read(load)
        status["this_process"] = {
            "id": self.process_id,
            "version": self.active.version if self.active else None,
        }
        status["last_load"] = asdict(self.last_report) if self.last_report else None
        return status


def _record_version(tx: Tx, process_id: str, version: str) -> None:
    tx.execute(update(Process).where(Process.id == process_id).values(ruleset_version=version))


def _record_error(tx: Tx, process_id: str, error: dict[str, Any]) -> None:
    tx.execute(update(Process).where(Process.id == process_id).values(last_error=error))


def located(errors: list[LocatedError]) -> list[dict[str, Any]]:
    return [e.to_dict() for e in errors]
