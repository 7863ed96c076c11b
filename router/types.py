"""Named types used across the core (DESIGN.md "Names used everywhere")."""

from __future__ import annotations

from enum import IntEnum, StrEnum

from channels.base import CHANNEL_IDS

__all__ = [
    "CAPACITY_KEYS",
    "CHANNEL_IDS",
    "OPEN_STATES",
    "Actor",
    "AgentPresence",
    "ConversationState",
    "DeliveryStatus",
    "Direction",
    "EventKind",
    "IdentityKind",
    "OfferState",
    "OutboxState",
    "Priority",
    "Role",
]

# the channel ids are the channel contract's (channels/base.py), re-exported for the core
CAPACITY_KEYS = (*CHANNEL_IDS, "total")


class ConversationState(StrEnum):
    NEW = "new"
    QUEUED = "queued"
    OFFERED = "offered"
    ASSIGNED = "assigned"
    WAITING_CUSTOMER = "waiting_customer"
    RESOLVED = "resolved"
    CLOSED = "closed"


OPEN_STATES = (
    ConversationState.NEW,
    ConversationState.QUEUED,
    ConversationState.OFFERED,
    ConversationState.ASSIGNED,
    ConversationState.WAITING_CUSTOMER,
)


class Priority(IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2
    URGENT = 3

    @classmethod
    def parse(cls, name: str) -> Priority:
        return cls[name.upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


class OfferState(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    EXPIRED = "expired"
    WITHDRAWN = "withdrawn"
    CONNECTING = "connecting"  # accepted; the agent's phone is ringing (voice)


class OutboxState(StrEnum):
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"
    UNCERTAIN = "uncertain"  # found in `sending` after a crash; the inbox policy decides


class DeliveryStatus(StrEnum):
    RECEIVED = "received"
    QUEUED = "queued"
    SENDING = "sending"
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    FAILED = "failed"
    UNCERTAIN = "uncertain"


class Direction(StrEnum):
    IN = "in"
    OUT = "out"


class Role(StrEnum):
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        order = (Role.AGENT, Role.SUPERVISOR, Role.ADMIN)
        return order.index(self) >= order.index(needed)


class AgentPresence(StrEnum):
    ONLINE = "online"
    AWAY = "away"
    OFFLINE = "offline"


class IdentityKind(StrEnum):
    EMAIL = "email"
    PHONE = "phone"
    MESSENGER = "messenger"
    WHATSAPP = "whatsapp"
    WEBCHAT = "webchat"


class Actor(StrEnum):
    CUSTOMER = "customer"
    AGENT = "agent"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"
    SYSTEM = "system"


class EventKind(StrEnum):
    """ConversationEvent kinds (append-only; the source of KPIs and audits)."""

    CREATED = "created"
    ROUTED = "routed"
    QUEUED = "queued"
    OFFERED = "offered"
    OFFER_REJECTED = "offer_rejected"
    OFFER_EXPIRED = "offer_expired"
    OFFER_WITHDRAWN = "offer_withdrawn"
    ASSIGNED = "assigned"
    UNASSIGNED = "unassigned"
    TRANSFERRED = "transferred"
    ESCALATED = "escalated"
    MESSAGE_IN = "message_in"
    MESSAGE_OUT = "message_out"
    FIRST_RESPONSE = "first_response"
    RESOLVED = "resolved"
    REOPENED = "reopened"
    CLOSED = "closed"
    SLA_WARNING = "sla_warning"
    SLA_BREACHED = "sla_breached"
    CSAT = "csat"
    MERGED = "merged"
    SPLIT = "split"
    NOTE = "note"
    MOVED = "moved"
    OVERFLOW = "overflow"
    ABANDONED = "abandoned"
    SURVEY_SENT = "survey_sent"
    WRAP_UP_ENDED = "wrap_up_ended"
    AUTO_SKIPPED = "auto_skipped"  # an automatic message not sent (window closed, opted out)
    CALL = "call"  # a phone call's course: agent ringing, answered, ended, voicemail
