"""The data model (SQLAlchemy 2, typed). The database is the source of truth for all state.

Times are stored as UTC (``UTCDateTime``): aware datetimes in and out on every backend.
Identifiers are 64-bit integers (plain INTEGER PRIMARY KEY on SQLite).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Agent",
    "AgentConnection",
    "AgentLoad",
    "AgentSkill",
    "AgentStatusEvent",
    "Base",
    "Blob",
    "ChannelState",
    "Contact",
    "ContactHint",
    "ContactIdentity",
    "Conversation",
    "ConversationEvent",
    "EventStream",
    "Inbox",
    "Lease",
    "Message",
    "Offer",
    "Outbox",
    "Process",
    "Quarantine",
    "Queue",
    "QueueMember",
    "RoutingDecision",
    "Ruleset",
    "StreamEvent",
    "Timer",
    "User",
    "metadata",
    "table",
]

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored; use the injected clock")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: Json, list[Any]: Json}


def _id() -> Mapped[int]:
    return mapped_column(Id, primary_key=True, autoincrement=True)


# -- people -------------------------------------------------------------------------
class Contact(Base):
    __tablename__ = "contacts"
    id: Mapped[int] = _id()
    name: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))  # a verified address, when known
    phone: Mapped[str | None] = mapped_column(String(32))  # E.164, verified
    language: Mapped[str | None] = mapped_column(String(8))
    tier: Mapped[str | None] = mapped_column(String(64))
    vip: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    attributes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    merged_into_id: Mapped[int | None] = mapped_column(Id, ForeignKey("contacts.id"))
    erased_at: Mapped[datetime | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class ContactIdentity(Base):
    """A way to reach a contact. ``(kind, address, verified)`` is unique: at most one contact
    owns an address as verified (only verified identities link contacts) and at most one
    holds it as an unverified claim, kept apart from the verified owner."""

    __tablename__ = "contact_identities"
    __table_args__ = (UniqueConstraint("kind", "address", "verified"),)
    id: Mapped[int] = _id()
    contact_id: Mapped[int] = mapped_column(Id, ForeignKey("contacts.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    address: Mapped[str] = mapped_column(String(320))
    verified: Mapped[bool] = mapped_column(Boolean, default=False)
    verified_by: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class ContactHint(Base):
    """An unverified claim (a typed email, an unsigned id): shown to agents, never used to link."""

    __tablename__ = "contact_hints"
    id: Mapped[int] = _id()
    contact_id: Mapped[int] = mapped_column(Id, ForeignKey("contacts.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(String(320))
    source: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


class ContactLink(Base):
    """The audit of identity changes: a merge, a split, a verified identity linked, an
    erasure. ``detail`` holds what moved, so a merge can be explained and split back."""

    __tablename__ = "contact_links"
    __table_args__ = (Index("ix_contact_links_contact", "contact_id", "id"),)
    id: Mapped[int] = _id()
    action: Mapped[str] = mapped_column(String(16))  # merge | split | link | erase
    contact_id: Mapped[int] = mapped_column(Id)  # the surviving (or affected) contact
    other_contact_id: Mapped[int | None] = mapped_column(Id)  # merged away / split out
    identity_id: Mapped[int | None] = mapped_column(Id)
    actor: Mapped[str] = mapped_column(String(64))  # user:<id> | visitor | system
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class VerificationCode(Base):
    """A one-time code sent to an email address or phone number a web-chat visitor claims.
    Only the code's keyed hash is stored; it expires and allows a few attempts."""

    __tablename__ = "verification_codes"
    __table_args__ = (Index("ix_verification_codes_identity", "identity_id", "id"),)
    id: Mapped[int] = _id()
    identity_id: Mapped[int] = mapped_column(Id, ForeignKey("contact_identities.id"))
    kind: Mapped[str] = mapped_column(String(16))  # email | phone
    address: Mapped[str] = mapped_column(String(320))
    code_hash: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    expires_at: Mapped[datetime]
    used_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = _id()
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    token_created_at: Mapped[datetime | None]
    password_hash: Mapped[str | None] = mapped_column(String(255))
    password_changed_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class UserSession(Base):
    """A signed-in browser (the console): the cookie holds a random token, only its SHA-256
    is stored. Ended by sign-out, expiry, revoking the user, and by a change of the
    credential it was opened with (docs/security.md, "Revocation")."""

    __tablename__ = "user_sessions"
    id: Mapped[int] = _id()
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    # how the browser signed in: password | token | unknown (opened before this was kept)
    signed_in_with: Mapped[str] = mapped_column(String(16), server_default="unknown")
    # why it ended: signed_out | revoked | token_rotated | password_changed
    end_reason: Mapped[str | None] = mapped_column(String(32))


class Agent(Base):
    __tablename__ = "agents"
    __table_args__ = (
        Index("ix_agents_presence_idle", "presence", "idle_since"),
        Index("ix_agents_presence_rr", "presence", "rr_position"),
    )
    id: Mapped[int] = _id()
    user_id: Mapped[int] = mapped_column(Id, ForeignKey("users.id"), unique=True)
    display_name: Mapped[str] = mapped_column(String(200))
    presence: Mapped[str] = mapped_column(String(16), default="offline")
    presence_changed_at: Mapped[datetime]
    idle_since: Mapped[datetime]  # when the agent last became free of work (longest idle)
    phone: Mapped[str | None] = mapped_column(String(64))
    sip: Mapped[str | None] = mapped_column(String(255))
    exclusive_channels: Mapped[list[Any]] = mapped_column(default=list)
    missed_offers: Mapped[int] = mapped_column(Integer, default=0)
    rr_position: Mapped[int] = mapped_column(
        BigInteger, default=0
    )  # round robin, survives restarts
    disconnected_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class AgentConnection(Base):
    """A live agent socket in a process (presence survives reconnects and other processes)."""

    __tablename__ = "agent_connections"
    id: Mapped[int] = _id()
    agent_id: Mapped[int] = mapped_column(Id, ForeignKey("agents.id"), index=True)
    process_id: Mapped[str] = mapped_column(String(128), index=True)
    connected_at: Mapped[datetime]
    # the console session the socket signed in with; NULL: the user's API token
    session_id: Mapped[int | None] = mapped_column(Id)


class AgentSkill(Base):
    __tablename__ = "agent_skills"
    __table_args__ = (Index("ix_agent_skills_skill_level", "skill", "level"),)
    agent_id: Mapped[int] = mapped_column(Id, ForeignKey("agents.id"), primary_key=True)
    skill: Mapped[str] = mapped_column(String(64), primary_key=True)
    level: Mapped[int] = mapped_column(Integer)


class AgentLoad(Base):
    """Capacity per agent and channel (plus ``total``): claims are conditional updates on ``used``."""

    __tablename__ = "agent_load"
    agent_id: Mapped[int] = mapped_column(Id, ForeignKey("agents.id"), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    used: Mapped[int] = mapped_column(Integer, default=0)
    cap: Mapped[int] = mapped_column(Integer, default=0)


class AgentStatusEvent(Base):
    __tablename__ = "agent_status_events"
    id: Mapped[int] = _id()
    agent_id: Mapped[int] = mapped_column(Id, ForeignKey("agents.id"), index=True)
    at: Mapped[datetime]
    presence: Mapped[str] = mapped_column(String(16))
    load: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"webchat": [used, cap], ...}
    reason: Mapped[str] = mapped_column(String(64))


# -- configuration mirrors ----------------------------------------------------------
class Inbox(Base):
    __tablename__ = "inboxes"
    id: Mapped[int] = _id()
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    channel: Mapped[str] = mapped_column(String(16))
    provider: Mapped[str] = mapped_column(String(32))
    default_queue: Mapped[str | None] = mapped_column(String(64))
    continuity: Mapped[str] = mapped_column(String(16), default="join_open")
    reopen_window_s: Mapped[int] = mapped_column(Integer, default=7 * 86400)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)  # non-secret settings only
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime]


class Queue(Base):
    """Runtime mirror of the active ruleset's queues (rules.yaml is their only source)."""

    __tablename__ = "queues"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    ruleset_version: Mapped[str] = mapped_column(String(80))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    rr_cursor: Mapped[int] = mapped_column(BigInteger, default=0)


class QueueMember(Base):
    __tablename__ = "queue_members"
    queue: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(128), primary_key=True)


class Ruleset(Base):
    __tablename__ = "rulesets"
    id: Mapped[int] = _id()
    version: Mapped[str] = mapped_column(String(80), index=True)  # "sha256:<hex of the bytes>"
    text: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(8))  # file | api
    source_path: Mapped[str | None] = mapped_column(String(1024))
    activated_at: Mapped[datetime]
    activated_by: Mapped[str] = mapped_column(String(128))


# -- conversations ------------------------------------------------------------------
class Conversation(Base):
    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_contact_state", "contact_id", "state"),
        Index("ix_conversations_agent_state", "assigned_agent_id", "state"),
    )
    id: Mapped[int] = _id()
    contact_id: Mapped[int] = mapped_column(Id, ForeignKey("contacts.id"))
    inbox_id: Mapped[int] = mapped_column(Id, ForeignKey("inboxes.id"))
    channel: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(20))
    queue: Mapped[str | None] = mapped_column(String(64))
    priority: Mapped[int] = mapped_column(Integer, default=1)
    required_skills: Mapped[dict[str, Any]] = mapped_column(default=dict)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    language: Mapped[str | None] = mapped_column(String(8))
    subject: Mapped[str | None] = mapped_column(String(998))
    assigned_agent_id: Mapped[int | None] = mapped_column(Id, ForeignKey("agents.id"))
    preferred_agent_id: Mapped[int | None] = mapped_column(Id, ForeignKey("agents.id"))
    routing_decision_id: Mapped[int | None] = mapped_column(Id)
    previous_id: Mapped[int | None] = mapped_column(Id, ForeignKey("conversations.id"))
    auto_reply_sent: Mapped[bool] = mapped_column(Boolean, default=False)
    queued_at: Mapped[datetime | None]
    # when it entered its current queue (routing, transfer, escalation, move, reopen): the
    # origin of overflow steps; returning from an offer does not change it
    queue_entered_at: Mapped[datetime | None]
    overflow_step: Mapped[int] = mapped_column(Integer, default=0)
    # SLA clocks of the current cycle (created or reopened); null when not running
    sla_first_response_due_at: Mapped[datetime | None]
    sla_resolution_due_at: Mapped[datetime | None]
    sla_resolution_since: Mapped[datetime | None]  # running segment start (paused: null)
    sla_resolution_used_s: Mapped[float] = mapped_column(Float, default=0.0)
    # The earliest running SLA due time (NO_DUE when none, never NULL once routed, so the
    # queue order is one index walk): breaks ties within a priority.
    sla_due_at: Mapped[datetime | None]
    first_inbound_at: Mapped[datetime | None]
    last_inbound_at: Mapped[datetime | None]
    last_outbound_at: Mapped[datetime | None]
    first_response_at: Mapped[datetime | None]
    resolved_at: Mapped[datetime | None]
    closed_at: Mapped[datetime | None]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


# Queue order: priority (highest first), SLA due soonest, time in queue, id: one index walk.
Index(
    "ix_conversations_queue_order",
    Conversation.state,
    Conversation.priority.desc(),
    Conversation.sla_due_at,
    Conversation.queued_at,
    Conversation.id,
)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("inbox_id", "external_id"),
        Index("ix_messages_conversation", "conversation_id", "id"),
        Index("ix_messages_thread", "inbox_id", "thread_id"),
    )
    id: Mapped[int] = _id()
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id"))
    inbox_id: Mapped[int] = mapped_column(Id, ForeignKey("inboxes.id"))
    direction: Mapped[str] = mapped_column(String(4))
    external_id: Mapped[str | None] = mapped_column(String(512))
    # The id other messages refer to when they reply (an email's Message-ID), both directions
    thread_id: Mapped[str | None] = mapped_column(String(998))
    author: Mapped[str] = mapped_column(String(16))  # customer | agent | system
    agent_id: Mapped[int | None] = mapped_column(Id, ForeignKey("agents.id"))
    identity_id: Mapped[int | None] = mapped_column(Id, ForeignKey("contact_identities.id"))
    text: Mapped[str] = mapped_column(Text, default="")
    subject: Mapped[str | None] = mapped_column(String(998))
    attachments: Mapped[list[Any]] = mapped_column(default=list)
    delivery_status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    is_auto: Mapped[bool] = mapped_column(Boolean, default=False)
    is_note: Mapped[bool] = mapped_column(Boolean, default=False)
    provider_ts: Mapped[datetime | None]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class Offer(Base):
    __tablename__ = "offers"
    __table_args__ = (
        Index("ix_offers_due", "state", "expires_at"),
        Index("ix_offers_conversation", "conversation_id"),
        # At most one pending offer per conversation, enforced by the database.
        Index(
            "uq_offers_one_pending",
            "conversation_id",
            unique=True,
            sqlite_where=text("state = 'pending'"),
            postgresql_where=text("state = 'pending'"),
        ),
    )
    id: Mapped[int] = _id()
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id"))
    agent_id: Mapped[int] = mapped_column(Id, ForeignKey("agents.id"), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime]
    decided_at: Mapped[datetime | None]
    reason: Mapped[str | None] = mapped_column(String(64))


class ChannelState(Base):
    """A channel's own durable state per inbox (an email poller's cursor: UIDVALIDITY and the
    last UID imported), written only after what it covers is committed."""

    __tablename__ = "channel_state"
    __table_args__ = (UniqueConstraint("inbox_id", "key"),)
    id: Mapped[int] = _id()
    inbox_id: Mapped[int] = mapped_column(Id, ForeignKey("inboxes.id"))
    key: Mapped[str] = mapped_column(String(255))
    value: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime]


class Timer(Base):
    """A conversation's stored due time (overflow step, SLA warning or breach, end of a
    preferred agent's wait, end of wrap-up, closing a resolved conversation). A worker fires
    what is due by deleting the row (``DELETE ... RETURNING``), so each fires once, across
    processes and restarts."""

    __tablename__ = "timers"
    __table_args__ = (
        UniqueConstraint("conversation_id", "kind"),
        Index("ix_timers_due", "due_at"),
    )
    id: Mapped[int] = _id()
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id"))
    kind: Mapped[str] = mapped_column(String(32))
    due_at: Mapped[datetime]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class RoutingDecision(Base):
    __tablename__ = "routing_decisions"
    id: Mapped[int] = _id()
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id"), index=True)
    ruleset_version: Mapped[str] = mapped_column(String(80))
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decision: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class Outbox(Base):
    __tablename__ = "outbox"
    __table_args__ = (
        Index("ix_outbox_due", "state", "next_attempt_at"),
        Index("ix_outbox_conversation", "conversation_id", "id"),
    )
    id: Mapped[int] = _id()
    message_id: Mapped[int] = mapped_column(Id, ForeignKey("messages.id"), unique=True)
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id"))
    inbox_id: Mapped[int] = mapped_column(Id, ForeignKey("inboxes.id"))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime]
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[datetime | None]
    provider_id: Mapped[str | None] = mapped_column(String(255))
    last_error: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    uncertain_resends: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime]
    sent_at: Mapped[datetime | None]


class ConversationEvent(Base):
    """Append-only, never pruned: the source of KPIs and audits."""

    __tablename__ = "conversation_events"
    __table_args__ = (
        Index("ix_conversation_events_conversation", "conversation_id", "id"),
        Index("ix_conversation_events_kind_at", "kind", "at"),
        # who held a conversation before (router.policy: agents see what they held)
        Index("ix_conversation_events_agent", "agent_id", "conversation_id"),
    )
    id: Mapped[int] = _id()
    conversation_id: Mapped[int] = mapped_column(Id, ForeignKey("conversations.id"))
    kind: Mapped[str] = mapped_column(String(24))
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(16))
    agent_id: Mapped[int | None] = mapped_column(Id)
    queue: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class EventStream(Base):
    """Per-stream sequence counter: ``UPDATE ... SET last_seq = last_seq + n RETURNING``
    in the state change's transaction makes each stream gapless in commit order."""

    __tablename__ = "event_streams"
    stream: Mapped[str] = mapped_column(String(96), primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=0)


class StreamEvent(Base):
    __tablename__ = "stream_events"
    __table_args__ = (UniqueConstraint("stream", "seq"), Index("ix_stream_events_at", "at"))
    id: Mapped[int] = _id()
    stream: Mapped[str] = mapped_column(String(96))
    seq: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime]
    type: Mapped[str] = mapped_column(String(48))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)


# -- operations ---------------------------------------------------------------------
class Process(Base):
    """Each running ``serve`` process: heartbeat, the ruleset it routes with, its last load error."""

    __tablename__ = "processes"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]
    ruleset_version: Mapped[str | None] = mapped_column(String(80))
    last_error: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Lease(Base):
    __tablename__ = "leases"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime]


class Quarantine(Base):
    """Inbound input that could not be handled, kept raw with its reason for admins."""

    __tablename__ = "quarantine"
    __table_args__ = (Index("ix_quarantine_external", "inbox_id", "external_id"),)
    id: Mapped[int] = _id()
    inbox_id: Mapped[int | None] = mapped_column(Id, ForeignKey("inboxes.id"))
    source: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    # The item's dedupe key (an email's Message-ID key): kept once per inbox
    external_id: Mapped[str | None] = mapped_column(String(512))
    blob_key: Mapped[str | None] = mapped_column(String(255))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    resolved_at: Mapped[datetime | None]


class Blob(Base):
    """Index of stored attachments (the bytes live in the blob adapter)."""

    __tablename__ = "blobs"
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    content_type: Mapped[str] = mapped_column(String(255))
    filename: Mapped[str | None] = mapped_column(String(512))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime]


def table(model: type[Base]) -> Table:
    """A model's Core table: statements on it skip the ORM's bulk-persistence layer, which
    matters on hot paths (prepared once, executed with parameters)."""
    return cast(Table, model.__table__)
