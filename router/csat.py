"""Customer satisfaction surveys (docs/kpis.md, "CSAT").

When an agent resolves a conversation whose reply channel has ``survey: csat`` (or ``nps``)
in channels.yaml, the customer gets one question there: buttons in the web chat, a reply of
1-5 (0-10 for NPS) on SMS, Messenger and WhatsApp, links in an email. The survey is an
automatic message, so it respects opt-out and messaging windows (outside a window it is
skipped and recorded, never sent with a human-agent tag). For 24 hours an inbound message
that is exactly a score is recorded as the answer and does not reopen the conversation;
later, the same message is an ordinary one (and reopens as usual).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update

from router.db import Tx
from router.events import SUPERVISORS, add_event
from router.models import Conversation, ConversationEvent, Message
from router.outbox import enqueue_message
from router.serialize import iso
from router.types import Actor, ConversationState, EventKind

__all__ = [
    "PENDING_FOR",
    "answer_of",
    "link_signature",
    "pending_survey",
    "record_score",
    "send_survey",
    "visitor_answer",
]

PENDING_FOR = timedelta(hours=24)
SCORE = re.compile(r"^\s*(\d{1,2})\s*[.!]?\s*$")
QUESTIONS = {
    "csat": "How would you rate the help you got? Reply with a number from 1 (poor) to 5 (great).",
    "nps": "How likely are you to recommend us to a friend? Reply with a number from 0 to 10.",
}
RANGE = {"csat": (1, 5), "nps": (0, 10)}


def link_signature(secret: bytes, conversation_id: int) -> str:
    return hmac.new(secret, f"survey:{conversation_id}".encode(), hashlib.sha256).hexdigest()[:32]


def send_survey(tx: Tx, conversation_id: int) -> int | None:
    """Ask the question on the conversation's reply channel, if its inbox has a survey.
    Returns the message id (None when none is sent: no survey, opted out, window closed)."""
    last = tx.execute(
        select(Message.inbox_id)
        .where(Message.conversation_id == conversation_id, Message.direction == "in")
        .order_by(Message.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    channel = tx.context.get("channels", {}).get(last)
    kind = getattr(getattr(channel, "config", None), "survey", "off")
    if channel is None or kind == "off":
        return None
    low, high = RANGE[kind]
    text = channel.config.survey_question or QUESTIONS[kind]
    if channel.channel_id == "email":
        base = str(tx.context.get("public_base_url", "")).rstrip("/")
        sig = link_signature(tx.context.get("thread_secret", b""), conversation_id)
        links = "\n".join(
            f"{n}: {base}/survey/{conversation_id}/{sig}/{n}" for n in range(high, low - 1, -1)
        )
        text = f"{text.split(' Reply with')[0]}\n\nChoose one:\n{links}"
    message_id = enqueue_message(
        tx,
        conversation_id,
        text,
        author=Actor.SYSTEM,
        is_auto=True,
        extra={"survey": {"scale": kind, "min": low, "max": high}},
    )
    if message_id is None:
        return None
    row = tx.execute(select(Conversation.data).where(Conversation.id == conversation_id)).one()
    data = dict(row.data or {})
    data["survey"] = {
        "scale": kind,
        "sent_at": iso(tx.now),
        "until": iso(tx.now + PENDING_FOR),
        "message_id": message_id,
    }
    tx.execute(update(Conversation).where(Conversation.id == conversation_id).values(data=data))
    add_event(tx, conversation_id, EventKind.SURVEY_SENT, scale=kind, message_id=message_id)
    return message_id


def pending_survey(conversation: Any, now: datetime) -> dict[str, Any] | None:
    survey = (conversation.data or {}).get("survey")
    if not survey or "score" in survey:
        return None
    if conversation.state not in (ConversationState.RESOLVED.value, ConversationState.CLOSED.value):
        return None
    if datetime.fromisoformat(survey["until"]) <= now:
        return None
    return dict(survey)


def answer_of(tx: Tx, contact_id: int, text: str) -> tuple[Any, int] | None:
    """``(conversation, score)`` when ``text`` is exactly a score for a survey of this contact
    still pending; else None (the message is an ordinary one)."""
    found = SCORE.match(text or "")
    if found is None:
        return None
    score = int(found.group(1))
    rows = tx.execute(
        select(Conversation)
        .where(
            Conversation.contact_id == contact_id,
            Conversation.state.in_(
                [ConversationState.RESOLVED.value, ConversationState.CLOSED.value]
            ),
        )
        .order_by(Conversation.resolved_at.desc(), Conversation.id.desc())
        .limit(3)
    ).all()
    for row in rows:
        survey = pending_survey(row, tx.now)
        if survey is not None:
            low, high = RANGE[survey["scale"]]
            return (row, score) if low <= score <= high else None
    return None


def record_score(tx: Tx, conversation: Any, score: int, via: str) -> bool:
    """The customer's answer: stored on the conversation and as a CSAT event (for the
    agent who resolved it). False when no survey is pending or the score is out of range."""
    survey = pending_survey(conversation, tx.now)
    if survey is None:
        return False
    low, high = RANGE[survey["scale"]]
    if not low <= score <= high:
        return False
    data = dict(conversation.data or {})
    data["survey"] = {**survey, "score": score, "answered_at": iso(tx.now), "via": via}
    tx.execute(update(Conversation).where(Conversation.id == conversation.id).values(data=data))
    add_event(
        tx,
        conversation.id,
        EventKind.CSAT,
        Actor.CUSTOMER,
        agent_id=conversation.assigned_agent_id,
        queue=conversation.queue,
        score=score,
        scale=survey["scale"],
        via=via,
    )
    tx.emit(
        SUPERVISORS,
        "csat",
        {
            "conversation_id": conversation.id,
            "score": score,
            "scale": survey["scale"],
            "queue": conversation.queue,
            "agent_id": conversation.assigned_agent_id,
        },
    )
    return True


def visitor_answer(tx: Tx, identity_id: int, score: object) -> bool:
    """A web-chat visitor pressed a survey button: the answer for the newest conversation
    they wrote in that has a survey pending."""
    if not isinstance(score, int) or isinstance(score, bool):
        return False
    conversations = (
        select(Message.conversation_id)
        .where(Message.identity_id == identity_id, Message.direction == "in")
        .distinct()
    )
    for row in tx.execute(
        select(Conversation)
        .where(Conversation.id.in_(conversations))
        .order_by(Conversation.id.desc())
        .limit(5)
    ):
        if pending_survey(row, tx.now) is not None:
            return record_score(tx, row, score, "webchat")
    return False


def link_answer(tx: Tx, conversation_id: int, score: int) -> bool:
    row = tx.execute(select(Conversation).where(Conversation.id == conversation_id)).first()
    return row is not None and record_score(tx, row, score, "email")


def last_score(tx: Tx | Any, contact_id: int) -> int | None:
    """The contact's latest CSAT answer (the ``history.last_csat`` fact)."""
    data = tx.execute(
        select(ConversationEvent.data)
        .join(Conversation, Conversation.id == ConversationEvent.conversation_id)
        .where(
            Conversation.contact_id == contact_id,
            ConversationEvent.kind == EventKind.CSAT.value,
        )
        .order_by(ConversationEvent.id.desc())
        .limit(1)
    ).scalar_one_or_none()
    if not data or data.get("scale") != "csat":
        return None
    return int(data["score"])
