"""The outbox: every outbound message is sent at least once, and none is lost.

    queued --claim--> sending --provider ok--> sent
       ^                 |  \\--temporary error--> queued (backoff with jitter)
       |                 |   \\--permanent error / attempts used up--> failed
       |                 \\--process died mid-send--> uncertain (the inbox's policy decides)
       \\---------- resend (policy resend, a check that found nothing, an agent's "resend")

The move to ``sending`` is committed before the provider is called, so a crash inside a
send leaves evidence. A claim is a conditional update (plus ``FOR UPDATE SKIP LOCKED`` on
PostgreSQL), so two workers never send one row. Policies for an uncertain send:
``resend`` (email: the same Message-ID lets the receiving side drop a duplicate),
``check`` (ask the provider whether it exists, resend only if not), ``ask`` (mark the
message uncertain; the agent sees "may not have been sent, resend?"). Every uncertain
resend is counted on the row and reported.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, exists, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import aliased

from channels.base import (
    Attachment,
    Channel,
    OutboundMessage,
    PermanentSendError,
    Sender,
    SendReceipt,
    TemporarySendError,
    UncertainPolicy,
)
from router.assignment import sla
from router.assignment.capacity import holds_while_waiting, release
from router.assignment.timers import current_ruleset
from router.db import Database, Tx
from router.events import add_event, agent_stream
from router.exceptions import Conflict, InvalidInput, NotFound, Unavailable
from router.failpoints import failpoint
from router.models import ContactIdentity, Conversation, Inbox, Message, Outbox, Process
from router.serialize import message_payload
from router.tasks import periodic
from router.types import Actor, ConversationState, DeliveryStatus, Direction, EventKind, OutboxState

__all__ = [
    "ClaimedSend",
    "OutboxSender",
    "claim_due",
    "enqueue_message",
    "resend",
    "set_opt_out",
    "window_of",
]

log = logging.getLogger(__name__)


def _recipient(
    tx: Tx, conversation: Conversation, identity_id: int | None, inbox_id: int | None = None
) -> tuple[int, int]:
    """``(inbox_id, identity_id)`` to reply through: by default the channel and identity of
    the customer's latest inbound message. An agent may choose another identity of the
    contact (answer a missed call by SMS) and the inbox to send through; replies go only to
    verified identities, apart from the one who wrote last."""
    last = tx.execute(
        select(Message.inbox_id, Message.identity_id)
        .where(
            Message.conversation_id == conversation.id,
            Message.direction == "in",
            Message.identity_id.is_not(None),
        )
        .order_by(Message.id.desc())
        .limit(1)
    ).first()
    if identity_id is None and inbox_id is None:
        if last is None:
            raise InvalidInput("no customer identity to reply to in this conversation")
        return int(last.inbox_id), int(last.identity_id)
    if identity_id is None:
        if last is None:
            raise InvalidInput("no customer identity to reply to in this conversation")
        identity_id = int(last.identity_id)
    identity = tx.execute(
        select(ContactIdentity.contact_id, ContactIdentity.kind, ContactIdentity.verified).where(
            ContactIdentity.id == identity_id
        )
    ).first()
    if identity is None or identity.contact_id != conversation.contact_id:
        raise InvalidInput("that identity does not belong to this conversation's contact")
    if not identity.verified and (last is None or identity_id != last.identity_id):
        raise InvalidInput(
            "replies go only to verified identities (or to whoever wrote last): this one is "
            "an unverified claim"
        )
    channels = tx.context.get("channels", {})

    def can_send(inbox: int | None) -> bool:
        channel = channels.get(inbox)
        return channel is not None and channel.sends_to(identity.kind)

    if inbox_id is not None:
        if channels and not can_send(inbox_id):
            raise InvalidInput(f"that inbox cannot send to a {identity.kind} identity")
        return inbox_id, identity_id
    wrote_in = tx.execute(
        select(Message.inbox_id)
        .where(Message.identity_id == identity_id, Message.direction == "in")
        .order_by(Message.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if not channels or can_send(wrote_in):
        return int(wrote_in or conversation.inbox_id), identity_id
    inbox_id = next((i for i in sorted(channels) if can_send(i)), None)
    if inbox_id is None:
        raise InvalidInput(f"no inbox here can send to a {identity.kind} identity")
    return int(inbox_id), identity_id


def _window(tx: Tx, inbox_id: int, identity_id: int) -> str:
    return window_of(tx, tx.context.get("channels", {}), inbox_id, identity_id, tx.now)


def window_of(
    conn: Connection | Tx, channels: dict[int, Any], inbox_id: int, identity_id: int, now: datetime
) -> str:
    """The messaging window of (inbox, identity), from the provider's time of the identity's
    last inbound message there (the channel knows its rules; most have no window)."""
    channel = channels.get(inbox_id)
    if channel is None or channel.messaging_window is None:
        return "open"
    last = conn.execute(
        select(func.max(func.coalesce(Message.provider_ts, Message.created_at))).where(
            Message.inbox_id == inbox_id,
            Message.identity_id == identity_id,
            Message.direction == Direction.IN.value,
        )
    ).scalar_one_or_none()
    return str(channel.window(last, now))


def _check_window(
    tx: Tx, inbox_id: int, window: str, provider_template: dict[str, Any] | None
) -> None:
    """An agent's message outside the window: a clear refusal, or the template choice."""
    channel = tx.context["channels"][inbox_id]
    # the window's length is the channel's (Meta's 24 hours), not the core's
    span = channel.messaging_window
    ago = f"more than {span.total_seconds() / 3600:g} hours ago" if span else "too long ago"
    if window == "closed":
        raise Conflict(
            f"the customer last wrote {ago}: this channel allows no reply until they write again",
            window=window,
        )
    if window == "template_only" and not provider_template:
        names = channel.templates()
        raise Conflict(
            f"the customer last wrote {ago}: only an approved template can "
            + (
                f"be sent (one of {', '.join(names)})"
                if names
                else "be sent, and this inbox lists none"
            ),
            window=window,
            templates=names,
        )


def enqueue_message(
    tx: Tx,
    conversation_id: int,
    text: str,
    *,
    author: Actor,
    agent_id: int | None = None,
    is_auto: bool = False,
    is_note: bool = False,
    subject: str | None = None,
    attachments: list[dict[str, Any]] | None = None,
    identity_id: int | None = None,
    inbox_id: int | None = None,
    client_id: str | None = None,
    template: str | None = None,
    provider_template: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> int | None:
    """Store an outbound message (and its outbox row, unless it is an internal note) in the
    caller's transaction. Returns the message id."""
    conversation = tx.execute(
        select(Conversation).where(Conversation.id == conversation_id)
    ).first()
    if conversation is None:
        raise NotFound(f"no conversation {conversation_id}")
    now = tx.now
    if is_note:
        inbox_id, recipient = conversation.inbox_id, None
    else:
        inbox_id, recipient = _recipient(tx, conversation, identity_id, inbox_id)
        identity = tx.execute(
            select(ContactIdentity.kind, ContactIdentity.address, ContactIdentity.data).where(
                ContactIdentity.id == recipient
            )
        ).one()
        if (identity.data or {}).get("opted_out_at"):
            if author == Actor.AGENT and not is_auto:
                raise Conflict(
                    "the customer opted out of messages on this number (they sent STOP); "
                    "nothing can be sent to it until they send START"
                )
            return None  # no automatic message goes to an opted-out identity
    data: dict[str, Any] = {
        k: v for k, v in {"client_id": client_id, "template": template}.items() if v
    }
    data.update(extra or {})
    if recipient is not None and attachments:
        channel = tx.context.get("channels", {}).get(inbox_id)
        if channel is not None and not channel.attachments:
            raise InvalidInput(f"the {channel.channel_id} channel cannot send attachments")
    if recipient is not None:
        window = _window(tx, inbox_id, recipient)
        if window != "open":
            if is_auto or author != Actor.AGENT:  # never outside the window, and said so
                reason = f"automatic message not sent: the messaging window is {window}"
                log.info("conversation %s: %s", conversation_id, reason)
                add_event(tx, conversation_id, EventKind.AUTO_SKIPPED, reason=reason)
                return None
            _check_window(tx, inbox_id, window, provider_template)
            data["window"] = window
        if provider_template:
            data["provider_template"] = provider_template
    message_id = int(
        tx.execute(
            insert(Message)
            .values(
                conversation_id=conversation_id,
                inbox_id=inbox_id,
                direction=Direction.OUT.value,
                author=author.value,
                agent_id=agent_id,
                identity_id=recipient,
                text=text,
                subject=subject,
                attachments=attachments or [],
                delivery_status=(DeliveryStatus.SENT if is_note else DeliveryStatus.QUEUED).value,
                is_auto=is_auto,
                is_note=is_note,
                data=data,
                created_at=now,
            )
            .returning(Message.id)
        ).scalar_one()
    )
    if is_note:
        add_event(
            tx,
            conversation_id,
            EventKind.NOTE,
            Actor(author),
            agent_id=agent_id,
            message_id=message_id,
        )
    else:
        tx.execute(
            insert(Outbox).values(
                message_id=message_id,
                conversation_id=conversation_id,
                inbox_id=inbox_id,
                state=OutboxState.QUEUED.value,
                attempts=0,
                next_attempt_at=now,
                payload={"recipient": {"kind": identity.kind, "address": identity.address}},
                created_at=now,
            )
        )
        wake = tx.context.get("outbox_wake")
        if wake is not None:
            tx.on_commit(wake)  # the outbox sends it as soon as it is committed
        add_event(
            tx,
            conversation_id,
            EventKind.MESSAGE_OUT,
            Actor(author),
            agent_id=agent_id,
            message_id=message_id,
            auto=is_auto,
        )
        changes: dict[str, Any] = {"last_outbound_at": now, "updated_at": now}
        human = author == Actor.AGENT and not is_auto
        if human and conversation.first_response_at is None:
            changes["first_response_at"] = now
            add_event(
                tx,
                conversation_id,
                EventKind.FIRST_RESPONSE,
                Actor.AGENT,
                agent_id=agent_id,
                message_id=message_id,
            )
        if human:  # first response stops; the customer has the turn
            turn = conversation.state == ConversationState.ASSIGNED
            sla.agent_answered(tx, conversation, current_ruleset(tx), customer_turn=turn)
        if human and conversation.state == ConversationState.ASSIGNED:
            changes["state"] = ConversationState.WAITING_CUSTOMER.value
            if conversation.assigned_agent_id is not None and not holds_while_waiting(
                conversation.channel
            ):
                release(
                    tx, conversation.assigned_agent_id, conversation.channel, "waiting_customer"
                )
        tx.execute(update(Conversation).where(Conversation.id == conversation_id).values(**changes))
    if conversation.assigned_agent_id is not None:
        row = tx.execute(
            select(Message, Inbox.channel.label("inbox_channel"))
            .join(Inbox, Inbox.id == Message.inbox_id)
            .where(Message.id == message_id)
        ).one()
        tx.emit(
            agent_stream(conversation.assigned_agent_id),
            "message",
            {
                "conversation_id": conversation_id,
                # the reply's own channel (an answer by SMS to a call says sms)
                "message": message_payload(row, row.inbox_channel),
            },
        )
    return message_id


@dataclass(frozen=True, slots=True)
class ClaimedSend:
    outbox_id: int
    message_id: int
    conversation_id: int
    inbox_id: int
    attempt: int
    claimed_at: datetime
    message: OutboundMessage


def _outbound(row: Any, **context: Any) -> OutboundMessage:
    recipient = (row.payload or {}).get("recipient", {})
    progress = (row.payload or {}).get("progress")
    return OutboundMessage(
        message_id=row.message_id,
        conversation_id=row.conversation_id,
        recipient=Sender(recipient.get("kind", ""), recipient.get("address", ""), True),
        text=row.text,
        subject=row.subject,
        attachments=tuple(
            Attachment(
                a.get("filename") or "file",
                a.get("content_type") or "application/octet-stream",
                int(a.get("size") or 0),
                a.get("blob_key"),
            )
            for a in row.attachments or []
        ),
        is_auto=row.is_auto,
        sender_name=row.display_name,
        attempt=row.attempts,
        data={**(row.data or {}), **context},
        progress=progress,
    )


def _load_claimed(
    conn: Connection, outbox_ids: list[int], claimed_at: datetime
) -> list[ClaimedSend]:
    if not outbox_ids:
        return []
    from router.models import Agent

    rows = conn.execute(
        select(
            Outbox.id.label("outbox_id"),
            Outbox.inbox_id,
            Outbox.attempts,
            Outbox.payload,
            Message.id.label("message_id"),
            Message.conversation_id,
            Message.text,
            Message.subject,
            Message.attachments,
            Message.is_auto,
            Message.data,
            Agent.display_name,
        )
        .join(Message, Message.id == Outbox.message_id)
        .outerjoin(Agent, Agent.id == Message.agent_id)
        .where(Outbox.id.in_(outbox_ids))
        .order_by(Outbox.id)
    ).all()
    # What a threaded channel (email) needs: the ids of the conversation's messages, oldest
    # first (for In-Reply-To/References), and the conversation's subject.
    threads: dict[int, list[dict[str, str]]] = {}
    subjects: dict[int, str | None] = {}
    conversation_ids = sorted({r.conversation_id for r in rows})
    for m in conn.execute(
        select(Message.conversation_id, Message.direction, Message.thread_id)
        .where(Message.conversation_id.in_(conversation_ids), Message.thread_id.is_not(None))
        .order_by(Message.id)
    ):
        threads.setdefault(m.conversation_id, []).append(
            {"direction": m.direction, "id": m.thread_id}
        )
    for c in conn.execute(
        select(Conversation.id, Conversation.subject).where(Conversation.id.in_(conversation_ids))
    ):
        subjects[c.id] = c.subject
    return [
        ClaimedSend(
            r.outbox_id,
            r.message_id,
            r.conversation_id,
            r.inbox_id,
            r.attempts,
            claimed_at,
            _outbound(
                r,
                thread=threads.get(r.conversation_id, [])[-20:],
                conversation_subject=subjects.get(r.conversation_id),
            ),
        )
        for r in rows
    ]


# States of an earlier row of the same conversation that hold a later one back: it has not
# gone out yet, or may have (a recovery is about to decide). A row that failed, or that waits
# for an agent's "resend?" (uncertain, no longer claimed), does not hold the others.
_UNFINISHED = (OutboxState.QUEUED.value, OutboxState.SENDING.value)


def _head_of_conversation() -> Any:
    """True for an outbox row with no unfinished earlier row in its conversation: messages of
    one conversation leave in the order they were written, across retries and restarts."""
    earlier = aliased(Outbox)
    return ~exists().where(
        earlier.conversation_id == Outbox.conversation_id,
        earlier.id < Outbox.id,
        or_(
            earlier.state.in_(_UNFINISHED),
            and_(earlier.state == OutboxState.UNCERTAIN.value, earlier.claimed_by.is_not(None)),
        ),
    )


def claim_due(
    tx: Tx,
    holder: str,
    limit: int,
    per_inbox: int | None = None,
    busy: dict[int, int] | None = None,
) -> list[ClaimedSend]:
    """Claim up to ``limit`` due rows: ``queued -> sending``, committed before any send.

    Only the oldest unfinished row of each conversation is due (order). With ``per_inbox``,
    at most that many rows of one inbox are in flight in this process, counting the ``busy``
    ones it already sends: one slow provider fills its own slots, never the others'."""
    ranked = (
        select(
            Outbox.id,
            Outbox.inbox_id,
            func.row_number().over(partition_by=Outbox.inbox_id, order_by=Outbox.id).label("rank"),
        )
        .where(
            Outbox.state == OutboxState.QUEUED.value,
            Outbox.next_attempt_at <= tx.now,
            _head_of_conversation(),
        )
        .subquery()
    )
    due = select(ranked.c.id, ranked.c.inbox_id).order_by(ranked.c.id)
    if per_inbox is not None:
        due = due.where(ranked.c.rank <= per_inbox)
    busy = busy or {}
    ids: list[int] = []
    taken: dict[int, int] = {}
    for row in tx.execute(due.limit(limit * 4 if per_inbox is not None else limit)):
        inbox = int(row.inbox_id)
        if per_inbox is not None and busy.get(inbox, 0) + taken.get(inbox, 0) >= per_inbox:
            continue
        taken[inbox] = taken.get(inbox, 0) + 1
        ids.append(int(row.id))
        if len(ids) >= limit:
            break
    if not ids:
        return []
    # A conditional update: two workers (or processes) never claim one row.
    claimed = [
        int(i)
        for i in tx.execute(
            update(Outbox)
            .where(
                Outbox.id.in_(ids),
                Outbox.state == OutboxState.QUEUED.value,
                _head_of_conversation(),
            )
            .values(
                state=OutboxState.SENDING.value,
                claimed_by=holder,
                claimed_at=tx.now,
                attempts=Outbox.attempts + 1,
            )
            .returning(Outbox.id)
        ).scalars()
    ]
    if claimed:
        message_ids = (
            tx.execute(select(Outbox.message_id).where(Outbox.id.in_(claimed))).scalars().all()
        )
        tx.execute(
            update(Message)
            .where(Message.id.in_(message_ids))
            .values(delivery_status=DeliveryStatus.SENDING.value)
        )
    return _load_claimed(tx.conn, claimed, tx.now)


def _notify(
    tx: Tx,
    message_id: int,
    status: str,
    error: str | None = None,
    *,
    possible_duplicate: bool = False,
) -> None:
    row = tx.execute(
        select(Message.conversation_id, Conversation.assigned_agent_id)
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Message.id == message_id)
    ).one()
    if row.assigned_agent_id is not None:
        tx.emit(
            agent_stream(row.assigned_agent_id),
            "delivery",
            {
                "conversation_id": row.conversation_id,
                "message_id": message_id,
                "status": status,
                "error": error,
                **({"possible_duplicate": True} if possible_duplicate else {}),
            },
        )


def set_opt_out(tx: Tx, identity_id: int, opted_out: bool, how: str) -> None:
    """The customer opted out of (STOP) or back into (START) messages on this identity: no
    reply, survey or automatic message goes to it while opted out."""
    data = tx.execute(
        select(ContactIdentity.data).where(ContactIdentity.id == identity_id)
    ).scalar_one()
    data = {k: v for k, v in (data or {}).items() if k not in ("opted_out_at", "opted_out_by")}
    if opted_out:
        data.update(opted_out_at=tx.now.isoformat(), opted_out_by=how)
    tx.execute(update(ContactIdentity).where(ContactIdentity.id == identity_id).values(data=data))


def _opted_out(tx: Tx, recipient: Sender) -> None:
    """The provider says the number opted out: every identity holding it (verified or not)."""
    for identity in tx.execute(
        select(ContactIdentity.id).where(
            ContactIdentity.kind == recipient.kind, ContactIdentity.address == recipient.address
        )
    ).scalars():
        set_opt_out(tx, int(identity), True, "provider")


def mark_sent(tx: Tx, outbox_id: int, holder: str, receipt: SendReceipt) -> bool:
    done = tx.execute(
        update(Outbox)
        .where(
            Outbox.id == outbox_id,
            Outbox.state == OutboxState.SENDING.value,
            Outbox.claimed_by == holder,
        )
        .values(
            state=OutboxState.SENT.value,
            provider_id=receipt.provider_id,
            sent_at=tx.now,
            last_error=None,
            uncertain_resends=Outbox.uncertain_resends + receipt.uncertain_resends,
        )
        .returning(Outbox.message_id)
    ).scalar_one_or_none()
    if done is None:
        return False
    data = dict(receipt.data)
    if receipt.uncertain_resends:
        # the provider may hold an earlier copy too: counted and shown, never silent
        data["possible_duplicate"] = True
        log.warning(
            "outbox %s: sent, but an earlier attempt may have gone out too (%d possible"
            " duplicates)",
            outbox_id,
            receipt.uncertain_resends,
        )
    message = tx.execute(select(Message.data).where(Message.id == done)).scalar_one()
    tx.execute(
        update(Message)
        .where(
            Message.id == done,
            Message.delivery_status.in_(
                [
                    DeliveryStatus.SENDING.value,
                    DeliveryStatus.QUEUED.value,
                    DeliveryStatus.UNCERTAIN.value,
                ]
            ),
        )
        .values(
            delivery_status=receipt.status if receipt.status in ("sent", "delivered") else "sent",
            external_id=receipt.provider_id,
            thread_id=receipt.data.get("thread_id"),
            data={**(message or {}), **data},
        )
    )
    _notify(tx, int(done), "sent", possible_duplicate=bool(data.get("possible_duplicate")))
    return True


def mark_deferred(
    tx: Tx,
    outbox_id: int,
    holder: str,
    reason: str,
    at: datetime,
    progress: Mapping[str, Any] | None = None,
) -> str:
    """Back to ``queued`` until ``at`` without using an attempt: the channel did not try (it
    waits before a look-up). The claim's attempt is given back."""
    mark_retry(tx, outbox_id, holder, reason, at, max_attempts=1 << 30, progress=progress)
    tx.execute(
        update(Outbox)
        .where(Outbox.id == outbox_id, Outbox.attempts > 0)
        .values(attempts=Outbox.attempts - 1)
    )
    return "deferred"


def mark_retry(
    tx: Tx,
    outbox_id: int,
    holder: str,
    error: str,
    at: datetime,
    max_attempts: int,
    progress: Mapping[str, Any] | None = None,
) -> str:
    """Back to ``queued`` for another attempt at ``at`` (``failed`` when the attempts are
    used up); ``progress`` (the channel's state to resume from) is kept with the row."""
    row = tx.execute(
        select(Outbox.attempts, Outbox.message_id, Outbox.payload).where(Outbox.id == outbox_id)
    ).one()
    if row.attempts >= max_attempts:
        return mark_failed(tx, outbox_id, holder, f"gave up after {row.attempts} attempts: {error}")
    values: dict[str, Any] = {}
    if progress is not None:
        values["payload"] = {**(row.payload or {}), "progress": dict(progress)}
    tx.execute(
        update(Outbox)
        .where(
            Outbox.id == outbox_id,
            Outbox.state == OutboxState.SENDING.value,
            Outbox.claimed_by == holder,
        )
        .values(
            state=OutboxState.QUEUED.value,
            next_attempt_at=at,
            last_error=error[:2000],
            claimed_by=None,
            **values,
        )
    )
    tx.execute(
        update(Message)
        .where(Message.id == row.message_id)
        .values(delivery_status=DeliveryStatus.QUEUED.value)
    )
    return "retry"


def mark_failed(tx: Tx, outbox_id: int, holder: str | None, error: str) -> str:
    query = update(Outbox).where(Outbox.id == outbox_id)
    if holder is not None:
        query = query.where(Outbox.claimed_by == holder)
    message_id = tx.execute(
        query.values(state=OutboxState.FAILED.value, last_error=error[:2000]).returning(
            Outbox.message_id
        )
    ).scalar_one_or_none()
    if message_id is not None:
        tx.execute(
            update(Message)
            .where(Message.id == message_id)
            .values(delivery_status=DeliveryStatus.FAILED.value, error=error[:2000])
        )
        _notify(tx, int(message_id), DeliveryStatus.FAILED.value, error)
    return "failed"


def find_stale_sends(
    tx: Tx, me: str, dead_after: float, mine_in_flight: frozenset[int] = frozenset()
) -> list[int]:
    """Rows left in ``sending`` by a process that is gone, and rows of this process in
    ``sending`` that it no longer sends (its recording of the result failed for good, or a
    task was lost): mark them uncertain. Returns every uncertain row still waiting for its
    inbox's policy (``claimed_by`` still set): those just marked, and those a kill or a
    failed provider check interrupted before the policy was applied, so none stays
    uncertain for good."""
    alive_since = tx.now - timedelta(seconds=dead_after)
    live = select(Process.id).where(Process.heartbeat_at >= alive_since, Process.id != me)
    stale = (
        select(Outbox.id)
        .where(
            Outbox.state == OutboxState.SENDING.value,
            or_(
                and_(Outbox.claimed_by != me, Outbox.claimed_by.not_in(live)),
                and_(
                    Outbox.claimed_by == me,
                    Outbox.claimed_at <= alive_since,
                    Outbox.id.not_in(sorted(mine_in_flight) or [0]),
                ),
            ),
        )
        .order_by(Outbox.id)
    )
    ids = [int(i) for i in tx.execute(stale).scalars()]
    if ids:
        tx.execute(
            update(Outbox)
            .where(Outbox.id.in_(ids), Outbox.state == OutboxState.SENDING.value)
            .values(state=OutboxState.UNCERTAIN.value)
        )
    waiting = select(Outbox.id).where(
        Outbox.state == OutboxState.UNCERTAIN.value, Outbox.claimed_by.is_not(None)
    )
    return [int(i) for i in tx.execute(waiting.order_by(Outbox.id).limit(500)).scalars()]


def resend(tx: Tx, outbox_id: int, reason: str) -> bool:
    """Queue an uncertain (or failed) send again; counted as a possible duplicate."""
    message_id = tx.execute(
        update(Outbox)
        .where(
            Outbox.id == outbox_id,
            Outbox.state.in_([OutboxState.UNCERTAIN.value, OutboxState.FAILED.value]),
        )
        .values(
            state=OutboxState.QUEUED.value,
            next_attempt_at=tx.now,
            claimed_by=None,
            uncertain_resends=Outbox.uncertain_resends + 1,
            last_error=reason,
        )
        .returning(Outbox.message_id)
    ).scalar_one_or_none()
    if message_id is None:
        return False
    tx.execute(
        update(Message)
        .where(Message.id == message_id)
        .values(delivery_status=DeliveryStatus.QUEUED.value, error=None)
    )
    log.warning(
        "outbox %s: resending a send that may have gone out already (%s)", outbox_id, reason
    )
    return True


def mark_uncertain_for_agent(tx: Tx, outbox_id: int) -> None:
    """Policy ``ask``: the row stays uncertain, no longer waiting for a policy (its sender
    cleared); the agent sees the message as possibly not sent and may resend it."""
    message_id = tx.execute(
        update(Outbox)
        .where(Outbox.id == outbox_id)
        .values(claimed_by=None)
        .returning(Outbox.message_id)
    ).scalar_one()
    tx.execute(
        update(Message)
        .where(Message.id == message_id)
        .values(
            delivery_status=DeliveryStatus.UNCERTAIN.value, error="may not have been sent; resend?"
        )
    )
    _notify(tx, int(message_id), DeliveryStatus.UNCERTAIN.value, "may not have been sent; resend?")


def backlog(conn: Connection) -> int:
    return int(
        conn.execute(
            select(func.count())
            .select_from(Outbox)
            .where(Outbox.state.in_([OutboxState.QUEUED.value, OutboxState.SENDING.value]))
        ).scalar_one()
    )


class OutboxSender:
    """The worker that sends due outbox rows through their inbox's channel.

    Sends proceed independently: the worker claims what may go now (the oldest unfinished
    message of each conversation, at most ``per_inbox`` in flight per inbox and
    ``concurrency`` in all), starts each send as its own task and claims again as soon as
    one ends. A send that hangs holds its own slot, and the later messages of its own
    conversation, and nothing else. The outcome of a send is recorded with retries until
    the database takes it: a row never stays ``sending`` while its process lives.
    """

    def __init__(
        self,
        db: Database,
        channel_for: Callable[[int], Channel | None],
        *,
        holder: str,
        max_attempts: int,
        backoff_base: float,
        backoff_max: float,
        dead_after: float,
        concurrency: int = 64,
        per_inbox: int = 8,
        on_sent: Callable[[int, str], None] | None = None,
    ) -> None:
        self.db = db
        self.channel_for = channel_for
        self.holder = holder
        self.max_attempts = max_attempts
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.dead_after = dead_after
        self.concurrency = concurrency
        self.per_inbox = per_inbox
        self._wake = asyncio.Event()
        self._recovery_every = 0.0  # set by run(): its interval
        self._next_recovery = 0.0
        self.on_sent = on_sent
        self._draining = False
        self._in_flight: dict[int, int] = {}  # outbox id -> inbox id, sent by this process
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.record_retry = 0.5  # first pause before recording an outcome again (seconds)

    def busy(self) -> dict[int, int]:
        """Sends in flight in this process, per inbox."""
        counts: dict[int, int] = {}
        for inbox in self._in_flight.values():
            counts[inbox] = counts.get(inbox, 0) + 1
        return counts

    async def drain(self, timeout: float) -> bool:
        """A graceful stop: claim nothing more and let the sends in flight finish (up to
        ``timeout``), so a shutdown leaves no send uncertain. True when none was left."""
        self._draining = True
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d sends still in flight at shutdown: left for recovery", len(self._tasks))
            return False
        return True

    async def close(self) -> None:
        """Cancel the sends still in flight (after ``drain``): recovery takes them up."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def wake(self) -> None:
        self._wake.set()

    async def run(self, interval: float) -> None:
        self._recovery_every = interval
        try:
            await periodic(self.step, interval, "outbox worker", wake=self._wake)
        finally:
            await self.close()

    async def step(self) -> None:
        # Recovery (a write) once per interval, not on every wake-up: a wake means new
        # sends, and a busy inbox wakes the worker for nearly every message.
        now = time.monotonic()
        if now >= self._next_recovery:
            self._next_recovery = now + self._recovery_every
            await self.recover_uncertain()
        while await self.start_due():
            pass

    async def _claim(self, limit: int) -> list[ClaimedSend]:
        if self._draining or limit <= 0:
            return []
        claimed: list[ClaimedSend] = await self.db.write(
            claim_due, self.holder, limit, self.per_inbox, self.busy()
        )
        for job in claimed:
            self._in_flight[job.outbox_id] = job.inbox_id
        if claimed:
            self._idle.clear()
        return claimed

    def _finished(self, job: ClaimedSend) -> None:
        self._in_flight.pop(job.outbox_id, None)
        if not self._in_flight:
            self._idle.set()
        self.wake()  # a slot is free, and the conversation's next message may go

    async def start_due(self, limit: int = 64) -> int:
        """Claim what may go now and start sending it, without waiting for the sends.
        Returns the number started (0: nothing due, or every slot taken)."""
        claimed = await self._claim(min(limit, self.concurrency - len(self._in_flight)))
        for job in claimed:
            task = asyncio.ensure_future(self._send_and_finish(job))
            task.set_name(f"outbox-send-{job.outbox_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claimed)

    async def process_due(self, limit: int = 64) -> int:
        """Send everything that may go now, waiting for the sends (tests, and callers that
        want the outcome): claims again after each round, since a sent message lets its
        conversation's next one go. Returns the number claimed."""
        total = 0
        while claimed := await self._claim(limit):
            total += len(claimed)
            await asyncio.gather(*(self._send_and_finish(job) for job in claimed))
        return total

    async def _send_and_finish(self, job: ClaimedSend) -> None:
        try:
            await self._send(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("send of outbox %s failed unexpectedly: recovery takes it", job.outbox_id)
        finally:
            self._finished(job)

    async def _record(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Write a send's outcome; while the database cannot take it, keep trying (with
        backoff) for as long as this process lives: the provider answered, so the outcome
        must not be lost, and the row must not stay ``sending``."""
        pause = self.record_retry
        while True:
            try:
                return await self.db.write(fn, *args)
            except (DBAPIError, Unavailable, OSError) as exc:
                log.warning(
                    "cannot record the outcome of a send (%s): trying again in %.1fs",
                    type(exc).__name__,
                    pause,
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 10.0)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.backoff_max))
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** max(0, attempt - 1)))
        return random.uniform(ceiling / 2, ceiling)  # jitter: never a thundering herd

    async def _retry(
        self,
        job: ClaimedSend,
        reason: str,
        *,
        after: float | None = None,
        retry_after: float | None = None,
        progress: Mapping[str, Any] | None = None,
    ) -> None:
        delay = after if after is not None else self._backoff(job.attempt, retry_after)
        at = self.db.clock.now() + timedelta(seconds=delay)
        await self._record(
            mark_retry, job.outbox_id, self.holder, reason, at, self.max_attempts, progress
        )

    async def _send(self, job: ClaimedSend) -> None:
        channel = self.channel_for(job.inbox_id)
        if channel is None:
            await self._retry(job, "inbox disabled or not configured", after=60)
            return
        failpoint("before_outbox_send")
        try:
            receipt = await channel.send(job.message)
        except TemporarySendError as exc:
            if exc.deferred and exc.retry_after is not None:
                # not an attempt: call again then, attempts and backoff untouched
                at = self.db.clock.now() + timedelta(seconds=max(0.0, exc.retry_after))
                await self._record(
                    mark_deferred, job.outbox_id, self.holder, exc.reason, at, exc.progress
                )
                return
            await self._retry(job, exc.reason, retry_after=exc.retry_after, progress=exc.progress)
            return
        except PermanentSendError as exc:
            reason = exc.reason
            if exc.opted_out:  # the provider says the recipient opted out (replied STOP)
                await self._record(_opted_out, job.message.recipient)
                reason = f"the customer opted out of messages (STOP): {exc.reason}"
            await self._record(mark_failed, job.outbox_id, self.holder, reason)
            return
        except Exception as exc:  # an unexpected error is treated as temporary, and logged
            log.exception("send of outbox %s raised", job.outbox_id)
            await self._retry(job, f"{type(exc).__name__}: {exc}")
            return
        failpoint("after_provider_send")
        await self._record(mark_sent, job.outbox_id, self.holder, receipt)
        if self.on_sent is not None:
            self.on_sent(job.inbox_id, "sent")

    async def recover_uncertain(self) -> int:
        """Apply each inbox's policy to sends a dead process left in ``sending``."""
        ids = await self.db.write(
            find_stale_sends, self.holder, self.dead_after, frozenset(self._in_flight)
        )
        for outbox_id in ids:
            jobs = await self.db.read(_load_claimed, [outbox_id], self.db.clock.now())
            if not jobs:
                continue
            job = jobs[0]
            channel = self.channel_for(job.inbox_id)
            policy = channel.policy if channel is not None else UncertainPolicy.ASK
            if policy is UncertainPolicy.RESEND:
                await self.db.write(
                    resend, outbox_id, "uncertain after a crash: resent (policy resend)"
                )
            elif policy is UncertainPolicy.CHECK and channel is not None:
                claimed_at = await self.db.read(
                    lambda c, i=outbox_id: c.execute(
                        select(Outbox.claimed_at).where(Outbox.id == i)
                    ).scalar_one()
                )
                try:
                    found = await channel.find_sent(job.message, claimed_at)
                except Exception as exc:
                    failures = await self.db.write(_check_failed, outbox_id)
                    if failures < CHECKS_BEFORE_RESEND:
                        log.warning(
                            "checking uncertain send %s failed (%s, %d of %d); trying again at"
                            " the next recovery",
                            outbox_id,
                            type(exc).__name__,
                            failures,
                            CHECKS_BEFORE_RESEND,
                        )
                        continue
                    # the provider cannot be asked: resend rather than never send, counted
                    await self.db.write(
                        resend,
                        outbox_id,
                        f"uncertain after a crash: the provider could not be asked"
                        f" {failures} times, resent",
                    )
                    continue
                if found is not None:
                    await self.db.write(_settle_found, outbox_id, found)
                else:
                    await self.db.write(
                        resend,
                        outbox_id,
                        "uncertain after a crash: the provider has no record, resent",
                    )
            else:
                await self.db.write(mark_uncertain_for_agent, outbox_id)
        if ids:
            self.wake()
        return len(ids)


# An uncertain send under policy ``check`` whose provider cannot be asked this many
# recoveries in a row is resent (and counted as a possible duplicate): it converges.
CHECKS_BEFORE_RESEND = 5


def _check_failed(tx: Tx, outbox_id: int) -> int:
    """Count a failed provider check on the row; returns the failures so far."""
    payload = tx.execute(select(Outbox.payload).where(Outbox.id == outbox_id)).scalar_one()
    failures = int((payload or {}).get("check_failures", 0)) + 1
    tx.execute(
        update(Outbox)
        .where(Outbox.id == outbox_id)
        .values(payload={**(payload or {}), "check_failures": failures})
    )
    return failures


def _settle_found(tx: Tx, outbox_id: int, receipt: SendReceipt) -> None:
    tx.execute(
        update(Outbox)
        .where(Outbox.id == outbox_id)
        .values(state=OutboxState.SENDING.value, claimed_by="recovery")
    )
    mark_sent(tx, outbox_id, "recovery", receipt)
