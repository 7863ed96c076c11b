"""Prometheus metrics, one registry per runtime (so tests can run several)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection, func, select

from router.models import Agent, Conversation, ConversationEvent, Offer

__all__ = ["Metrics", "service_snapshot"]


def service_snapshot(conn: Connection, now: datetime) -> dict[str, Any]:
    """What /metrics reads from the database at each scrape (the same for every process)."""
    waiting: dict[str, tuple[int, float]] = {}
    for queue, count, oldest in conn.execute(
        select(Conversation.queue, func.count(), func.min(Conversation.queued_at))
        .where(Conversation.state == "queued")
        .group_by(Conversation.queue)
    ):
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        waiting[queue or ""] = (int(count), max(0.0, age))
    return {
        "waiting": waiting,
        "agents": dict(
            conn.execute(select(Agent.presence, func.count()).group_by(Agent.presence)).all()
        ),
        "offers": dict(conn.execute(select(Offer.state, func.count()).group_by(Offer.state)).all()),
        "sla_breaches": dict(
            conn.execute(
                select(ConversationEvent.queue, func.count())
                .where(ConversationEvent.kind == "sla_breached")
                .group_by(ConversationEvent.queue)
            ).all()
        ),
    }


class _FromDatabase(Collector):
    """Series read from the database at scrape time (set by ``Metrics.update``)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] = {}

    def collect(self) -> Iterator[Any]:
        s = self.snapshot
        depth = GaugeMetricFamily(
            "omniroute_queue_waiting", "Conversations waiting per queue", labels=["queue"]
        )
        wait = GaugeMetricFamily(
            "omniroute_queue_longest_wait_seconds", "The longest wait per queue", labels=["queue"]
        )
        for queue, (count, age) in sorted(s.get("waiting", {}).items()):
            depth.add_metric([queue], count)
            wait.add_metric([queue], age)
        agents = GaugeMetricFamily("omniroute_agents", "Agents by presence", labels=["presence"])
        for presence in ("online", "away", "offline"):
            agents.add_metric([presence], s.get("agents", {}).get(presence, 0))
        offers = CounterMetricFamily("omniroute_offers", "Offers by outcome", labels=["outcome"])
        for outcome, count in sorted(s.get("offers", {}).items()):
            offers.add_metric([outcome], count)
        breaches = CounterMetricFamily(
            "omniroute_sla_breaches", "SLA breaches per queue", labels=["queue"]
        )
        for queue, count in sorted(s.get("sla_breaches", {}).items()):
            breaches.add_metric([queue or ""], count)
        yield from (depth, wait, agents, offers, breaches)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_in = Counter(
            "omniroute_messages_in", "Inbound messages stored", ["channel"], registry=r
        )
        self.messages_duplicate = Counter(
            "omniroute_messages_duplicate", "Inbound duplicates dropped", ["channel"], registry=r
        )
        self.messages_out = Counter(
            "omniroute_messages_out", "Outbound messages sent", ["channel"], registry=r
        )
        self.quarantined = Counter(
            "omniroute_quarantined", "Inbound items quarantined", ["source"], registry=r
        )
        self.webhook_rejected = Counter(
            "omniroute_webhook_rejected",
            "Webhook requests refused",
            ["provider", "reason"],
            registry=r,
        )
        self.routing_latency = Histogram(
            "omniroute_routing_latency_seconds",
            "From conversation creation to its routing decision",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.outbox_backlog = Gauge(
            "omniroute_outbox_backlog", "Outbound messages queued or sending", registry=r
        )
        self.websockets = Gauge(
            "omniroute_websockets", "Open websocket connections", ["kind"], registry=r
        )
        self.sockets_signed_out = Counter(
            "omniroute_sockets_signed_out",
            "Sockets closed because the credential they signed in with ended",
            ["reason"],
            registry=r,
        )
        self.assignment_latency = Histogram(
            "omniroute_assignment_latency_seconds",
            "From entering a queue to an agent taking the conversation",
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.write_batch = Histogram(
            "omniroute_db_write_batch_seconds",
            "SQLite: each batch of writes committed together, from its first statement to "
            "its commit (writes queued behind a batch wait for it)",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self._database = _FromDatabase()
        r.register(self._database)

    def update(self, snapshot: dict[str, Any]) -> None:
        self._database.snapshot = snapshot

    def render(self) -> bytes:
        return generate_latest(self.registry)
