"""Prometheus metrics, one registry per runtime (so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics"]


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

    def render(self) -> bytes:
        return generate_latest(self.registry)
