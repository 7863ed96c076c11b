"""The runtime: one process's database, bus, rules, channels and workers, wired together.

``Runtime.start()`` connects, takes the SQLite lock (one ``serve`` per SQLite file),
registers the process, loads the active ruleset and channels.yaml, and starts the workers:
routing sweep, outbox sender, rules watch (lease holder) and poll, heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select, update

from adapters.blobs import LocalBlobs
from adapters.bus import Bus, make_bus
from adapters.clock import Clock, SystemClock
from channels import WEBHOOK_APPS, Channel, channel_class
from channels.base import ChannelContext, InboxConfig, OutboundMessage, ParsedItem, SendReceipt
from channels.webchat import WebChatChannel
from router import retention
from router.abandon import abandon_gone_visitors, gone_visitors
from router.assignment.service import Assignment, register_process
from router.calls import Calls
from router.channel_state import InboxState
from router.channels_config import ChannelsConfig, load_channels
from router.db import Database, StreamRecord, Tx, insert_ignore
from router.events import visitor_stream
from router.exceptions import AlreadyRunning, ConfigError, DatabaseUnreachable, InvalidInput
from router.failpoints import configure as configure_failpoints
from router.failpoints import failpoint
from router.leases import release as release_lease
from router.leases import try_acquire
from router.metrics import Metrics
from router.migrate import current_revision, head_revision
from router.models import Inbox, Message, Process
from router.outbox import OutboxSender, backlog
from router.pipeline import InboxInfo, IngestOutcome, Pipeline, is_stored, load_inbox
from router.ratelimit import RateLimiter
from router.revocation import SocketGuard
from router.routing import ROUTE_BATCH, RouteResult, route_batch
from router.rules_service import RulesService
from router.secret_check import secret_problems
from router.serialize import visitor_payload
from router.settings import Settings
from router.tasks import TaskGroup, periodic
from routing_rules import RulesError

__all__ = ["Runtime"]

log = logging.getLogger(__name__)


def upsert_inboxes(tx: Tx, config: ChannelsConfig) -> None:
    """Upsert inboxes by slug; an inbox no longer in the file is disabled, never deleted."""
    for slug, inbox in config.inboxes.items():
        settings = {
            k: v for k, v in inbox.model_dump(mode="json").items() if not _secretish(inbox, k)
        }
        values = {
            "channel": inbox.channel,
            "provider": inbox.provider,
            "default_queue": inbox.default_queue,
            "continuity": inbox.continuity,
            "reopen_window_s": inbox.reopen_window_seconds,
            "settings": settings,
            "enabled": True,
            "updated_at": tx.now,
        }
        if not tx.execute(update(Inbox).where(Inbox.slug == slug).values(**values)).rowcount:
            insert_ignore(tx.conn, Inbox, {"slug": slug, **values})
    tx.execute(
        update(Inbox)
        .where(Inbox.slug.not_in(list(config.inboxes)))
        .values(enabled=False, updated_at=tx.now)
    )


def _secretish(model: InboxConfig, field: str) -> bool:
    from pydantic import SecretStr

    return isinstance(getattr(model, field, None), SecretStr)


def _register(tx: Tx, process_id: str) -> None:
    tx.execute(delete(Process).where(Process.id == process_id))
    register_process(tx, process_id)


_ON_VISITOR_STREAM = "on_visitor_stream"


def _emit_to_visitor(tx: Tx, address: str, message_id: int) -> None:
    """The message on the visitor's stream, once: a marker on the message commits with the
    event, so a resend after a crash inside the send does not show it twice."""
    row = tx.execute(select(Message).where(Message.id == message_id)).one()
    if (row.data or {}).get(_ON_VISITOR_STREAM):
        return
    tx.emit(visitor_stream(address), "message", visitor_payload(row))
    tx.execute(
        update(Message)
        .where(Message.id == message_id)
        .values(data={**(row.data or {}), _ON_VISITOR_STREAM: True})
    )


def _on_visitor_stream(conn: Any, message_id: int) -> bool:
    data = conn.execute(select(Message.data).where(Message.id == message_id)).scalar_one_or_none()
    return bool((data or {}).get(_ON_VISITOR_STREAM))


def _unregister(tx: Tx, process_id: str) -> None:
    tx.execute(delete(Process).where(Process.id == process_id))


class Runtime:
    def __init__(
        self, settings: Settings, *, clock: Clock | None = None, bus: Bus | None = None
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.process_id = f"{settings.process_id}:{os.getpid()}:{secrets.token_hex(3)}"
        self.metrics = Metrics()
        self.sockets: set[Any] = set()  # open websockets, told to reconnect on a graceful stop
        self._stopped = False
        # Per source address: 20 bad webhook signatures at once, refilling at 20 a minute;
        # beyond that the source gets 429 without its requests even being checked.
        self.bad_signatures = RateLimiter(20, 60)
        self.bus = bus or make_bus(settings.redis_url, settings.redis_prefix)
        self.db = Database(
            settings.database_url,
            clock=self.clock,
            sqlite_synchronous=settings.sqlite_synchronous,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            on_records=self._publish_records,
            on_batch=lambda _writes, seconds: self.metrics.write_batch.observe(seconds),
        )
        self.rules = RulesService(
            self.db,
            self.bus,
            rules_path=settings.rules_path,
            process_id=self.process_id,
            lease_ttl=settings.lease_ttl,
        )
        self.pipeline = Pipeline(self.db)
        self.pipeline.on_ingested.append(self._count_ingested)
        if self.db.dialect == "sqlite":
            self.pipeline.then = self._settle_in_ingest
        self.channels: dict[str, Channel] = {}
        self.inboxes: dict[str, InboxInfo] = {}
        self._inbox_by_id: dict[int, str] = {}
        self.channels_config = ChannelsConfig()
        self.outbox = OutboxSender(
            self.db,
            self.channel_for_inbox_id,
            holder=self.process_id,
            max_attempts=settings.outbox_max_attempts,
            backoff_base=settings.outbox_backoff_base,
            backoff_max=settings.outbox_backoff_max,
            dead_after=settings.heartbeat_interval * 3,
            concurrency=settings.outbox_concurrency,
            per_inbox=settings.outbox_per_inbox,
            on_sent=self._count_sent,
        )
        self.db.context["ruleset"] = lambda: self.rules.active
        self.db.context["thread_secret"] = self.channel_secret
        self.db.context["public_base_url"] = self.settings.public_base_url
        self.db.context["assignment_latency"] = self.metrics.assignment_latency.observe
        self.db.context["outbox_wake"] = self.outbox.wake  # after a commit that queued a send
        self.blobs = LocalBlobs(Path(self.settings.data_dir) / "blobs")
        self.assignment = Assignment(
            self.db,
            lambda: self.rules.active.queues if self.rules.active is not None else {},
            process_id=self.process_id,
            presence_grace=settings.presence_grace,
            dead_after=settings.heartbeat_interval * 3,
        )
        self._route_lock = asyncio.Lock()
        self._route_dirty = False
        self.workers = TaskGroup()
        self.background = TaskGroup()
        self.rules.listeners.append(self._on_rules_activated)
        self.assignment.rerouted.append(self.route_pending)
        self.calls = Calls(self)
        # Sockets close when the credential they signed in with ends (router.revocation).
        self.guard = SocketGuard(
            self.db,
            self.bus,
            self.clock,
            settings.credential_check_interval,
            on_signed_out=lambda reason: self.metrics.sockets_signed_out.labels(reason).inc(),
        )
        self.db.context["credentials_changed"] = self._credentials_changed
        self.assignment.connecting.append(self.calls.connect)
        self._lock_file: Any = None
        self.started = False
        self.ready_reasons: list[str] = ["starting"]

    # -- life cycle ---------------------------------------------------------------------
    async def start(self, *, workers: bool = True) -> None:
        self._stopped = False
        try:
            configure_failpoints(
                self.settings.failpoints or os.environ.get("OMNIROUTE_FAILPOINTS", "")
            )
        except ValueError as exc:  # the settings' check missed it: the environment changed
            raise ConfigError(f"OMNIROUTE_FAILPOINTS: {exc}") from None
        self.take_sqlite_lock()
        await self.db.start()
        try:
            await self._check_schema(self.db)
        except ConfigError:
            await self.db.close()
            self._release_sqlite_lock()
            raise
        await self.bus.start()
        await self.guard.start()
        await self.db.write(_register, self.process_id)
        await self.rules.start()
        await self.load_channels()
        self.started = True
        if workers:
            self.start_workers()

    def start_workers(self) -> None:
        s = self.settings
        self.workers.spawn(
            periodic(
                self._heartbeat, s.heartbeat_interval, "heartbeat", first_delay=s.heartbeat_interval
            ),
            "heartbeat",
        )
        self.workers.spawn(self.outbox.run(s.outbox_interval), "outbox")
        # A safety net: conversations left in ``new`` (a crash between commit and routing).
        self.workers.spawn(
            periodic(self.route_pending, s.worker_interval, "routing sweep"), "routing-sweep"
        )
        self.workers.spawn(self.rules.watch(s.rules_watch_interval), "rules-watch")
        self.workers.spawn(self.rules.poll(s.rules_poll_interval), "rules-poll")
        self.workers.spawn(self.assignment.run(s.worker_interval), "assignment")
        self.workers.spawn(
            periodic(self.abandon_sweep, s.worker_interval, "abandon sweep"), "abandon-sweep"
        )
        self.workers.spawn(
            periodic(self.prune_streams, s.stream_prune_interval, "stream retention"),
            "stream-retention",
        )
        self.workers.spawn(self.guard.run(), "credential-check")

    @contextlib.contextmanager
    def socket_open(self, ws: Any, kind: str) -> Iterator[None]:
        """An open websocket: counted in /metrics and told to reconnect on a graceful stop."""
        self.sockets.add(ws)
        try:
            with self.metrics.websockets.labels(kind).track_inprogress():
                yield
        finally:
            self.sockets.discard(ws)

    async def drain_sockets(self) -> None:
        """Tell every socket of this process to reconnect elsewhere (close 1012, "service
        restart"; clients reconnect and resume from their sequence numbers)."""
        frame = json.dumps({"type": "reconnect", "reason": "server shutting down"})

        async def tell(ws: Any) -> None:
            with contextlib.suppress(Exception):
                await ws.send_text(frame)
                await ws.close(1012, "server shutting down: reconnect")

        # all at once, and not for ever: a client that does not read must not hold the stop
        sockets = list(self.sockets)
        if sockets:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await asyncio.gather(*(tell(ws) for ws in sockets))

    async def abandon_sweep(self) -> list[int]:
        """Web chats whose visitor left before an agent joined, for too long: abandoned
        (the queue's ``abandon_after`` when it sets one, else the inbox's)."""
        after = {
            int(self.inboxes[slug].id): channel.abandon_after_seconds
            for slug, channel in self.channels.items()
            if isinstance(channel, WebChatChannel)
        }
        ruleset = self.rules.active
        queues = {
            name: spec.abandon_after.total_seconds()
            for name, spec in (ruleset.queues.items() if ruleset is not None else ())
            if spec.abandon_after is not None
        }
        # a read first: the sweep runs every worker interval, and writes only when one is due
        if not after or not await self.db.read(gone_visitors, after, self.clock.now(), queues):
            return []
        return await self.db.write(abandon_gone_visitors, after, queues)

    async def prune_streams(self, batch: int = retention.PRUNE_BATCH) -> int:
        """Delete the stream events older than ``stream_retention_days``, a batch per
        transaction, if this process holds the retention lease (one pruner among the
        processes). The number deleted."""
        horizon = self.clock.now() - timedelta(days=self.settings.stream_retention_days)
        # a read first: most runs find nothing to do and need no write (nor the lease)
        if not await self.db.read(retention.due_stream_events, horizon):
            return 0
        if not await self.db.write(
            try_acquire, retention.LEASE, self.process_id, self.settings.lease_ttl
        ):
            return 0  # another process prunes
        deleted = 0
        while True:
            count = await self.db.write(retention.prune_stream_events, horizon, batch)
            deleted += count
            if count < batch:
                break
            await asyncio.sleep(0)  # between batches, other writers go first
        if deleted:
            log.info("stream retention: deleted %d stream events before %s", deleted, horizon)
        return deleted

    async def stop(self, *, drain: float = 0.0) -> None:
        """Stop; with ``drain`` (seconds), gracefully: connected agents and visitors are told
        to reconnect (to another process) and the sends in flight finish first."""
        if self._stopped:
            return
        if drain > 0 and self.started:
            await self.drain_sockets()
            await self.outbox.drain(drain)
        self._stopped = True
        await self.workers.cancel()
        await self.background.drain(timeout=5)
        for channel in self.channels.values():
            try:
                await channel.stop()
            except Exception:
                log.exception("stopping channel %s failed", channel.slug)
        await self.rules.stop()
        await self.guard.stop()
        if self.started:
            try:
                await self.db.write(_unregister, self.process_id)
            except Exception:
                log.exception("could not unregister the process")
        await self.bus.close()
        await self.db.close()
        self._release_sqlite_lock()
        self.started = False

    async def _channel_lease(self, name: str, hold: bool) -> bool:
        """A channel's lease (one mailbox poller among the processes): take or renew it
        (``hold``), or give it up."""
        if hold:
            return bool(
                await self.db.write(
                    try_acquire, f"channel:{name}", self.process_id, self.settings.lease_ttl
                )
            )
        await self.db.write(release_lease, f"channel:{name}", self.process_id)
        return False

    def inbox_id_of(self, slug: str | None) -> int | None:
        """The id of a configured inbox (None for None); an unknown slug is a clear error."""
        if slug is None:
            return None
        info = self.inboxes.get(slug)
        if info is None:
            raise InvalidInput(f'no inbox "{slug}"', field="inbox")
        return int(info.id)

    @staticmethod
    async def _check_schema(db: Database) -> None:
        try:
            revision = await db.read(current_revision)
        except Exception as exc:
            raise DatabaseUnreachable(
                f"cannot reach the database: {type(exc).__name__}: {exc}"
            ) from None
        if revision != head_revision():
            raise ConfigError(
                f"the database is at migration {revision or 'none'}, this omniroute needs {head_revision()}: run `omniroute db upgrade`"
            )

    async def preflight(self, *, wait: float | None = None) -> None:
        """Fail early with one clear message: no placeholder or weak secret, database
        reachable and migrated, files valid.

        A PostgreSQL database that does not answer is waited for (backoff up to 30 s between
        tries, each logged), for ``wait`` seconds (None: for as long as it takes): a server
        started with, or before, its database comes up when it does."""
        problems = secret_problems(self.settings, None)
        if problems:
            raise ConfigError("refusing to serve:\n  " + "\n  ".join(problems))
        pause, waited = 1.0, 0.0
        while True:
            db = Database(self.settings.database_url)
            try:
                await db.start()
                await self._check_schema(db)
                break
            except DatabaseUnreachable as exc:
                if self.settings.is_sqlite or (wait is not None and waited >= wait):
                    raise
                log.warning(
                    "waiting for the database at %s (%s); next try in %.0f s",
                    db.url.render_as_string(hide_password=True),
                    exc.message.removeprefix("cannot reach the database: ")[:200],
                    pause,
                )
            finally:
                await db.close()
            await asyncio.sleep(pause)
            waited += pause
            pause = min(pause * 2, 30.0)
        if self.settings.channels_path is not None:
            try:
                config = load_channels(
                    self.settings.channels_path.read_bytes(), str(self.settings.channels_path)
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot read channels file {self.settings.channels_path}: {exc.strerror}"
                ) from None
            except RulesError as exc:
                raise ConfigError(f"channels file rejected:\n{exc}") from None
            problems = secret_problems(self.settings, config)
            if problems:
                raise ConfigError("refusing to serve:\n  " + "\n  ".join(problems))

    def take_sqlite_lock(self) -> None:
        """One ``serve`` per SQLite file: an exclusive lock on ``<database>.lock``."""
        if self._lock_file is not None:
            return
        path = Database(self.settings.database_url).sqlite_path if self.settings.is_sqlite else None
        if not path or path == ":memory:":
            return
        lock_path = Path(f"{path}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the process's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise AlreadyRunning(
                f"another omniroute process is serving {path} (lock {lock_path}). SQLite allows one "
                "process per database: stop the other one, or run several processes on PostgreSQL."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def _release_sqlite_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    async def readiness(self) -> list[str]:
        """Reasons this process is not ready (empty when ready)."""
        reasons = []
        if not self.started:
            reasons.append("starting")
        failed = self.db.write_failed
        window = 3 * self.settings.heartbeat_interval  # the heartbeat writes that often
        if failed is not None and time.monotonic() - failed[0] < window:
            # disk full, read-only, I/O errors: reads may still work, writes do not
            reasons.append(f"database cannot write: {failed[1]}")
        if not await self.db.ping():
            reasons.append("database unreachable")
        elif await self.db.read(current_revision) != head_revision():
            reasons.append("migrations not current")
        if self.rules.active is None:
            reasons.append("no active ruleset")
        if not self.bus.healthy:
            reasons.append("bus unreachable")
        return reasons

    # -- channels -----------------------------------------------------------------------
    async def load_channels(self) -> None:
        path = self.settings.channels_path
        if path is None:
            config = ChannelsConfig()
        else:
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read channels file {path}: {exc.strerror}") from None
            queues = set(self.rules.active.queues) if self.rules.active else None
            try:
                config = load_channels(data, str(path), queues=queues)
            except RulesError as exc:
                raise ConfigError(f"channels file rejected:\n{exc}") from None
        await self.db.write(upsert_inboxes, config)
        self.channels_config = config
        for old in self.channels.values():
            await old.stop()
        self.channels.clear()
        self.inboxes.clear()
        self._inbox_by_id.clear()
        for slug, inbox_config in config.inboxes.items():
            cls = channel_class(inbox_config.channel, inbox_config.provider)
            assert cls is not None  # validated by load_channels
            info = await self.db.read(load_inbox, slug)
            assert info is not None
            context = ChannelContext(
                slug=slug,
                public_base_url=self.settings.public_base_url,
                now=self.clock.now,
                deliver=self._deliver_for(slug),
                push=self._push_live,
                pushed=self._pushed,
                blobs=self.blobs,
                state=InboxState(self.db, info.id),
                secret=self.channel_secret,
                options=self._channel_options(config, inbox_config),
                lease=self._channel_lease,
                lease_ttl=self.settings.lease_ttl,
                stored=self._stored_for(info.id),
            )
            channel = cls(slug, inbox_config, context)
            # the blob store takes the largest attachment any inbox accepts (an email inbox's
            # max_size_mb may exceed its default): never an accepted file dropped for size
            self.blobs.max_size = max(self.blobs.max_size, channel.largest_attachment)
            self.channels[slug] = channel
            # what the outbox consults inside a transaction (messaging windows)
            self.db.context.setdefault("channels", {})[info.id] = channel
            self.inboxes[slug] = info
            self._inbox_by_id[info.id] = slug
            await channel.start()

    @staticmethod
    def _channel_options(config: ChannelsConfig, inbox_config: InboxConfig) -> dict[str, Any]:
        """An inbox of an app (a Meta app) gets its app's settings: the webhook is the app's."""
        app = config.app_of(inbox_config)
        kind = WEBHOOK_APPS.get(inbox_config.provider)
        return kind.options(app) if app is not None and kind is not None else {}

    @property
    def channel_secret(self) -> bytes:
        """The key of channel-level tokens (email thread tokens), derived from the secret key."""
        key = self.settings.secret_key
        base = key.get_secret_value().encode() if key is not None else b"omniroute-insecure"
        return hmac.new(base, b"channel tokens", hashlib.sha256).digest()

    def _stored_for(self, inbox_id: int) -> Callable[[str], Coroutine[Any, Any, bool]]:
        async def stored(external_id: str) -> bool:
            return bool(await self.db.read(is_stored, inbox_id, external_id))

        return stored

    def _deliver_for(
        self, slug: str
    ) -> Callable[[list[ParsedItem]], Coroutine[Any, Any, list[IngestOutcome]]]:
        async def deliver(items: list[ParsedItem]) -> list[IngestOutcome]:
            return await self.ingest(slug, items, source="poller", route_now=True)

        return deliver

    async def _push_live(self, message: OutboundMessage) -> SendReceipt:
        """Live delivery (web chat): a committed event on the visitor's stream, once."""
        await self.db.write(_emit_to_visitor, message.recipient.address, message.message_id)
        return SendReceipt(f"live-{message.message_id}", status="delivered")

    async def _pushed(self, message: OutboundMessage) -> SendReceipt | None:
        if await self.db.read(_on_visitor_stream, message.message_id):
            return SendReceipt(f"live-{message.message_id}", status="delivered")
        return None

    def channel_for_inbox_id(self, inbox_id: int) -> Channel | None:
        slug = self._inbox_by_id.get(inbox_id)
        return self.channels.get(slug) if slug else None

    # -- the inbound path ---------------------------------------------------------------
    async def ingest(
        self,
        slug: str,
        items: list[ParsedItem],
        *,
        source: str = "webhook",
        route_now: bool = False,
    ) -> list[IngestOutcome]:
        """Persist items for an inbox. The caller answers the provider after this returns and
        then calls ``after_ingest`` (webhooks), or passes ``route_now`` (pollers)."""
        inbox = self.inboxes[slug]
        outcomes = await self.pipeline.accept(inbox, items, source)
        if route_now:
            await self.after_ingest(outcomes)
        return outcomes

    async def after_ingest(self, outcomes: list[IngestOutcome]) -> None:
        """Route what the ingest created or reopened, and offer what went back to a queue,
        in the background."""
        route = dispatch = False
        for outcome in outcomes:
            if outcome.conversation_id is None or outcome.settled:
                continue
            if outcome.created or outcome.reopened:
                route = True
            elif outcome.requeued:
                dispatch = True
        if route:
            self.background.spawn(self.route_pending(), "route")
        elif dispatch:
            self.background.spawn(self.assignment.dispatch(), "dispatch")

    def _settle_in_ingest(self, tx: Tx) -> bool:
        """Route and offer after the ingests of one commit (SQLite's one writer): the work
        ``after_ingest`` would do in two more transactions. True when none is left."""
        ruleset = self.rules.active
        if ruleset is None:
            return False
        results = route_batch(tx, ruleset)
        tx.on_commit(lambda: self._observe_routed(results, tx.now))
        offered_all = self.assignment.dispatch_in(tx)
        return len(results) < ROUTE_BATCH and offered_all

    def _on_rules_activated(self, ruleset: Any) -> None:
        """New members or skills may make waiting work eligible: offer it now."""
        if self.started:
            self.background.spawn(self.assignment.dispatch(), "dispatch-after-rules")

    def _count_ingested(self, slug: str, outcome: IngestOutcome) -> None:
        channel = self.inboxes[slug].channel if slug in self.inboxes else "unknown"
        (self.metrics.messages_duplicate if outcome.duplicate else self.metrics.messages_in).labels(
            channel
        ).inc()

    def _count_sent(self, inbox_id: int, status: str) -> None:
        slug = self._inbox_by_id.get(inbox_id)
        self.metrics.messages_out.labels(self.inboxes[slug].channel if slug else "unknown").inc()

    async def route_pending(self) -> int:
        """Route every conversation waiting in ``new``, in batches. Concurrent calls coalesce:
        while a batch runs, further calls make it run once more."""
        self._route_dirty = True
        routed = 0
        async with self._route_lock:
            while self._route_dirty:
                self._route_dirty = False
                while True:
                    ruleset = self.rules.active
                    if ruleset is None:
                        return routed  # routed once a ruleset is active (the sweep retries)
                    results = await self.db.write(route_batch, ruleset)
                    if not results:
                        break
                    failpoint("after_route_commit")
                    routed += len(results)
                    self._observe_routed(results, self.clock.now())
                    self.background.spawn(self.assignment.dispatch(), "dispatch-after-routing")
                    if len(results) < ROUTE_BATCH:
                        break
        return routed

    def _observe_routed(self, results: list[RouteResult], now: datetime) -> None:
        """Each routed conversation's wait from creation to routing, in /metrics."""
        for result in results:
            self.metrics.routing_latency.observe(
                max(0.0, (now - result.created_at).total_seconds())
            )

    async def _heartbeat(self) -> None:
        # The heartbeat also re-asserts this process's agent sockets: after a database
        # outage others may have judged it dead and deleted them (docs/delivery.md).
        await self.assignment.reassert()
        self.metrics.outbox_backlog.set(await self.db.read(backlog))

    async def _credentials_changed(self, user_id: int) -> None:
        """After a commit that ended a credential of ``user_id``: every process closes the
        sockets that depended on it; offers it withdrew go to other agents now."""
        await self.guard.announce(user_id)
        self.background.spawn(self.assignment.dispatch(), "dispatch-after-sign-off")

    async def _publish_records(self, records: list[StreamRecord]) -> None:
        await self.bus.publish_many([(f"stream:{r.stream}", r.frame()) for r in records])
