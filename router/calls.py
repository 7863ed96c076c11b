"""Phone calls, the conversation's side: the caller waits in a room of their own, an
accepted offer rings the agent's phone into it, and the conversation is assigned only when
that leg answers.

A caller is never lost. An agent's leg that is not answered (no-answer, busy, failed, or
no callback at all before the offer's extended expiry) ends that offer and the caller,
still hearing the hold, is offered to the next agent. A caller who hangs up before an
agent answered is recorded as abandoned with the time they waited; offers are withdrawn
and capacity is freed. A caller who waited longer than the queue's ``voicemail_after``
(or calls out of the queue's hours) is offered voicemail; the recording and transcript
arrive as messages of the conversation, which stays queued as a callback.

The call's state lives in ``conversations.data["call"]``: ``sid`` (the caller's call id),
``caller``, ``stage`` (queued: holding for an agent; connected: talking to one; voicemail;
ended; an accept rings the agent's phone while the stage is queued or connected, so a
transfer of a call in progress brings the new agent in by phone), ``legs`` (agent id -> the
leg's id) and ``ringing`` (offer id -> the leg's id).

The provider is behind the call contract (:mod:`channels.calls`): the channel parses its
webhooks into call events, renders the answers chosen here, and performs the actions asked
of it (ringing a leg, hanging up...) after the transaction that decided them commits.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select, update

from channels.base import (
    InboundMessage,
    PermanentSendError,
    TemporarySendError,
    WebhookRequest,
    WebhookResponse,
)
from channels.calls import (
    Acknowledge,
    CallAnswer,
    CallArrived,
    CallChannel,
    CallEnded,
    CallEvent,
    ChoiceMade,
    HangUp,
    HoldTurn,
    LegAnswered,
    LegEnded,
    LegFailed,
    LegRinging,
    LegTag,
    Menu,
    OnHold,
    RecordVoicemail,
    StandBy,
    VoicemailLeft,
    VoicemailReached,
    WaitForAgent,
)
from router.assignment import flow
from router.assignment.core import abandon, end_offer, take_offered
from router.assignment.sla import queue_hours
from router.db import Connection, Tx
from router.events import add_event
from router.exceptions import Conflict
from router.models import Agent, Conversation, ConversationEvent, Message, Offer
from router.serialize import iso
from router.types import Actor, EventKind, OfferState
from router.types import ConversationState as S

if TYPE_CHECKING:
    from router.runtime import Runtime

__all__ = ["Calls"]

log = logging.getLogger(__name__)

_WAITING = (S.NEW.value, S.QUEUED.value, S.OFFERED.value)
_OPEN = (OfferState.PENDING.value, OfferState.CONNECTING.value)
_RECENT_WAITS = 20  # assigned calls of the queue whose waits estimate the next one's


# -- transactions -----------------------------------------------------------------------
def _locked(tx: Tx, conversation_id: int) -> Any:
    return tx.execute(
        select(Conversation).where(Conversation.id == conversation_id).with_for_update()
    ).first()


def _save_call(tx: Tx, row: Any, call: dict[str, Any]) -> None:
    data = dict(row.data or {})
    data["call"] = call
    tx.execute(
        update(Conversation).where(Conversation.id == row.id).values(data=data, updated_at=tx.now)
    )


def start_call(tx: Tx, conversation_id: int, call_sid: str, caller: str) -> None:
    """The caller is waiting (idempotent: the provider may retry the webhook)."""
    row = _locked(tx, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    if call.get("sid") == call_sid:
        return
    _save_call(
        tx,
        row,
        {
            "sid": call_sid,
            "caller": caller,
            "stage": "queued",
            "started_at": iso(tx.now),
            "legs": {},
            "ringing": {},
        },
    )
    add_event(tx, conversation_id, EventKind.CALL, what="started", call_sid=call_sid)


def note_ringing(tx: Tx, conversation_id: int, offer_id: int, leg_sid: str) -> None:
    row = _locked(tx, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    if call:
        call["ringing"] = {**call.get("ringing", {}), str(offer_id): leg_sid}
        _save_call(tx, row, call)


def leg_answered(tx: Tx, offer_id: int, leg_sid: str) -> dict[str, Any]:
    """The agent picked up: the offer is accepted and the conversation assigned. Returns
    the legs to take out of the call (a transferring agent's) or ``hangup`` when the call
    was given up meanwhile (the caller hung up, or the offer expired)."""
    offer = tx.execute(
        update(Offer)
        .where(Offer.id == offer_id, Offer.state == OfferState.CONNECTING.value)
        .values(state=OfferState.ACCEPTED.value, decided_at=tx.now)
        .returning(Offer.conversation_id, Offer.agent_id)
    ).first()
    if offer is None:
        return {"hangup": True}
    conversation_id, agent_id = int(offer.conversation_id), int(offer.agent_id)
    if not take_offered(tx, conversation_id, agent_id, offer_id, leg=leg_sid):
        raise RuntimeError(f"call conversation {conversation_id} left 'offered' while ringing")
    row = _locked(tx, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    others = [sid for agent, sid in call.get("legs", {}).items() if agent != str(agent_id)]
    ringing = dict(call.get("ringing", {}))
    ringing.pop(str(offer_id), None)
    call.update(
        legs={str(agent_id): leg_sid},
        ringing=ringing,
        stage="connected",
        answered_at=call.get("answered_at") or iso(tx.now),
        answered_by=agent_id,
    )
    _save_call(tx, row, call)
    return {"conversation_id": conversation_id, "remove": others}


def leg_failed(tx: Tx, offer_id: int, why: str) -> bool:
    """The agent's phone did not answer (or could not be called): that offer ends and the
    caller, still on hold, goes back to the queue for the next agent."""
    offer = tx.execute(
        update(Offer)
        .where(Offer.id == offer_id, Offer.state == OfferState.CONNECTING.value)
        .values(state=OfferState.REJECTED.value, decided_at=tx.now, reason=why[:64])
        .returning(Offer.id, Offer.conversation_id, Offer.agent_id, Offer.channel)
    ).first()
    if offer is None:
        return False
    end_offer(tx, offer, OfferState.REJECTED, EventKind.OFFER_REJECTED, why)
    row = _locked(tx, int(offer.conversation_id))
    call = dict((row.data or {}).get("call") or {})
    if call:
        call["ringing"] = {k: v for k, v in call.get("ringing", {}).items() if k != str(offer_id)}
        _save_call(tx, row, call)
    return True


def leg_ended(tx: Tx, conversation_id: int, agent_id: int, leg_sid: str, seconds: str) -> None:
    row = _locked(tx, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    if call.get("legs", {}).get(str(agent_id)) == leg_sid:
        call["legs"] = {k: v for k, v in call["legs"].items() if k != str(agent_id)}
        _save_call(tx, row, call)
    add_event(
        tx,
        conversation_id,
        EventKind.CALL,
        agent_id=agent_id,
        what="agent_left",
        leg=leg_sid,
        seconds=seconds,
    )


def call_ended(tx: Tx, conversation_id: int, status: str, seconds: str | None) -> list[str]:
    """The caller's call is over. Before an agent answered (and not in voicemail) it is an
    abandoned call: offers withdrawn, capacity freed, the conversation closed with the
    wait recorded. Returns the legs still ringing, to hang up."""
    row = _locked(tx, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    if not call or call.get("stage") == "ended":
        return []
    ringing = list(call.get("ringing", {}).values())
    started = call.get("started_at")
    waited = (tx.now - datetime.fromisoformat(started)).total_seconds() if started else None
    abandoned = row.state in _WAITING and call.get("stage") != "voicemail"
    call.update(stage="ended", status=status, seconds=seconds, ended_at=iso(tx.now))
    if abandoned:
        call["abandoned"] = True
        call["ringing"] = {}
        abandon(tx, conversation_id, waited, "caller hung up", call=call)
        return ringing
    _save_call(tx, row, call)
    add_event(
        tx,
        conversation_id,
        EventKind.CALL,
        agent_id=row.assigned_agent_id,
        what="ended",
        status=status,
        seconds=seconds,
    )
    return ringing


def go_to_voicemail(tx: Tx, conversation_id: int, why: str) -> bool:
    """The caller leaves the hold for voicemail (unless an agent's phone is ringing or they
    were connected meanwhile): pending offers are withdrawn; the conversation stays queued,
    now as a callback."""
    row = _locked(tx, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    if call.get("stage") != "queued" or call.get("ringing") or row.state not in _WAITING:
        return False
    offers = tx.execute(
        update(Offer)
        .where(
            Offer.conversation_id == conversation_id,
            Offer.state == OfferState.PENDING.value,
        )
        .values(state=OfferState.WITHDRAWN.value, decided_at=tx.now, reason="voicemail")
        .returning(Offer.id, Offer.conversation_id, Offer.agent_id, Offer.channel)
    ).all()
    for offer in offers:
        end_offer(tx, offer, OfferState.WITHDRAWN, EventKind.OFFER_WITHDRAWN, "voicemail")
    row = _locked(tx, conversation_id)
    call.update(stage="voicemail")
    _save_call(tx, row, call)
    add_event(tx, conversation_id, EventKind.CALL, queue=row.queue, what="voicemail", why=why)
    return True


def back_to_hold(tx: Tx, conversation_id: int) -> None:
    """Voicemail could not be reached (the provider refused to move the call): the caller
    is still holding, so they are a live call again."""
    row = _locked(tx, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    if call.get("stage") == "voicemail":
        call.update(stage="queued")
        _save_call(tx, row, call)


def calling_back(tx: Tx, agent_id: int, conversation_id: int) -> dict[str, Any]:
    """What an agent's call back needs: the conversation is theirs, the caller's number is
    known (not withheld), and the agent has a phone to be rung on."""
    row = flow.owned(tx, agent_id, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    if row.channel != "voice" or not call.get("caller"):
        raise Conflict("only a phone conversation can be called back")
    if call.get("stage") in ("queued", "connected"):
        raise Conflict("the call is still in progress")
    if str(call["caller"]).startswith("anonymous:"):
        raise Conflict("the caller withheld their number: answer by another channel")
    phone = tx.execute(select(Agent.phone, Agent.sip).where(Agent.id == agent_id)).one()
    to = phone.sip or phone.phone
    if not to:
        raise Conflict("to call back, your agent profile needs a phone number or SIP address")
    return {"inbox_id": row.inbox_id, "customer": call["caller"], "agent_phone": to}


def called_back(
    tx: Tx, agent_id: int, conversation_id: int, customer_sid: str, leg_sid: str
) -> None:
    row = _locked(tx, conversation_id)
    call = dict((row.data or {}).get("call") or {})
    call.update(
        sid=customer_sid,
        stage="connected",
        direction="outbound",
        legs={str(agent_id): leg_sid},
        ringing={},
        started_at=iso(tx.now),
    )
    _save_call(tx, row, call)
    add_event(tx, conversation_id, EventKind.CALL, Actor.AGENT, agent_id=agent_id, what="call_back")


def hold_info(conn: Connection, conversation_id: int) -> dict[str, Any] | None:
    """Where the caller stands: position in the queue (queue order: priority, then time
    in queue), the estimated wait (the recent waits of this queue's answered calls), how
    long they have waited, and whether voicemail is due."""
    row = conn.execute(select(Conversation).where(Conversation.id == conversation_id)).first()
    if row is None:
        return None
    call = (row.data or {}).get("call") or {}
    info: dict[str, Any] = {
        "call": call,
        "state": row.state,
        "queue": row.queue,
        "position": None,
        "estimate": None,
        "entered": row.queue_entered_at or row.created_at,
    }
    if row.state not in _WAITING or row.queue is None:
        return info
    since = row.queued_at or row.created_at
    ahead = conn.execute(
        select(func.count())
        .select_from(Conversation)
        .where(
            Conversation.queue == row.queue,
            Conversation.state.in_((S.QUEUED.value, S.OFFERED.value)),
            Conversation.id != row.id,
            or_(
                Conversation.priority > row.priority,
                and_(
                    Conversation.priority == row.priority,
                    or_(
                        Conversation.queued_at < since,
                        and_(Conversation.queued_at == since, Conversation.id < row.id),
                    ),
                ),
            ),
        )
    ).scalar_one()
    info["position"] = int(ahead) + 1
    waits = conn.execute(
        select(ConversationEvent.at, Conversation.queue_entered_at)
        .join(Conversation, Conversation.id == ConversationEvent.conversation_id)
        .where(
            ConversationEvent.kind == EventKind.ASSIGNED.value,
            Conversation.queue == row.queue,
            Conversation.channel == row.channel,
            Conversation.queue_entered_at.is_not(None),
        )
        .order_by(ConversationEvent.id.desc())
        .limit(_RECENT_WAITS)
    ).all()
    seconds = [
        (w.at - w.queue_entered_at).total_seconds() for w in waits if w.at >= w.queue_entered_at
    ]
    if seconds:
        info["estimate"] = info["position"] * sum(seconds) / len(seconds)
    return info


def conversation_of_call(conn: Connection, inbox_id: int, call_sid: str) -> int | None:
    found = conn.execute(
        select(Message.conversation_id).where(
            Message.inbox_id == inbox_id, Message.external_id == call_sid
        )
    ).scalar_one_or_none()
    return int(found) if found is not None else None


# -- the controller ---------------------------------------------------------------------
class Calls:
    """Answers the call channels' webhooks and drives the legs (see the module doc)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def _channel_of(self, inbox_id: int) -> CallChannel | None:
        channel = self.runtime.channel_for_inbox_id(inbox_id)
        return channel if isinstance(channel, CallChannel) else None

    async def webhook(
        self, channel: CallChannel, kind: str, hook: WebhookRequest
    ) -> WebhookResponse:
        """A verified call webhook: its event applied, answered in the channel's terms."""
        return channel.answer(await self._on(channel, channel.call_event(kind, hook)))

    async def _on(self, channel: CallChannel, event: CallEvent | None) -> CallAnswer:
        match event:
            case CallArrived(message):
                if channel.has_menu:
                    return Menu()  # the call is stored once the caller has chosen
                return await self._arrive(channel, message)
            case ChoiceMade(message):
                return await self._arrive(channel, message)
            case HoldTurn(conversation_id):
                return await self._hold(channel, conversation_id)
            case VoicemailReached(conversation_id, caller):
                if conversation_id is None:
                    return HangUp("Sorry, no message can be left now.")
                return RecordVoicemail(conversation_id, caller)
            case VoicemailLeft():
                return HangUp()
            case CallEnded():
                await self._call_ended(channel, event)
            case LegRinging() | LegAnswered() | LegEnded() | LegFailed():
                await self._leg(channel, event)
        return Acknowledge()

    async def _arrive(self, channel: CallChannel, message: InboundMessage) -> CallAnswer:
        """Store the call (its id dedupes a retried webhook), route it now (the answer
        depends on the queue's hours), then hold the caller in their room."""
        runtime = self.runtime
        if not message.external_id:
            return HangUp("Sorry, this call cannot be taken.")
        outcome = (await runtime.ingest(channel.slug, [message]))[0]
        cid = outcome.conversation_id
        if cid is None:
            return HangUp("Sorry, this call cannot be taken.")
        await runtime.db.write(start_call, cid, message.external_id, message.sender.address)
        await runtime.route_pending()
        await runtime.after_ingest([outcome])
        info = await runtime.db.read(hold_info, cid)
        if (
            info is not None
            and self._closed(info["queue"])
            and await runtime.db.write(go_to_voicemail, cid, "out of hours")
        ):
            return RecordVoicemail(cid, message.sender.address)
        return WaitForAgent(cid)

    def _closed(self, queue: str | None) -> bool:
        ruleset = self.runtime.rules.active
        spec = ruleset.queues.get(queue) if ruleset is not None and queue else None
        hours = queue_hours(ruleset, spec)
        return hours is not None and not hours.is_open(self.runtime.clock.now())

    def _voicemail_due(self, info: dict[str, Any]) -> bool:
        ruleset = self.runtime.rules.active
        spec = ruleset.queues.get(info["queue"]) if ruleset is not None and info["queue"] else None
        if spec is None or spec.voicemail_after is None or info["call"].get("stage") != "queued":
            return False
        waited = self.runtime.clock.now() - info["entered"]
        return waited >= spec.voicemail_after

    async def _hold(self, channel: CallChannel, cid: int | None) -> CallAnswer:
        info = await self.runtime.db.read(hold_info, cid) if cid is not None else None
        if info is None or cid is None:
            return OnHold(None, None)
        call = info["call"]
        holding = call.get("stage") == "queued"
        if self._voicemail_due(info) or (holding and self._closed(info["queue"])):
            why = "out of hours" if self._closed(info["queue"]) else "waited too long"
            if await self.runtime.db.write(go_to_voicemail, cid, why):
                try:
                    await channel.send_to_voicemail(call["sid"], cid, call.get("caller") or "")
                except (TemporarySendError, PermanentSendError) as exc:
                    log.warning("call %s not sent to voicemail: %s", call["sid"], exc.reason)
                    await self.runtime.db.write(back_to_hold, cid)
                else:
                    return StandBy()
        return OnHold(info["position"], info["estimate"])

    async def _call_ended(self, channel: CallChannel, event: CallEnded) -> None:
        runtime = self.runtime
        inbox_id = runtime.inboxes[channel.slug].id
        cid = event.conversation_id or await runtime.db.read(
            conversation_of_call, inbox_id, event.call_id
        )
        if cid is None:  # hung up in the menu: still a call that came in, and was missed
            outcome = (await runtime.ingest(channel.slug, [event.message]))[0]
            cid = outcome.conversation_id
            if cid is None:
                return
            await runtime.db.write(start_call, cid, event.call_id, event.message.sender.address)
        ringing = await runtime.db.write(call_ended, cid, event.status, event.seconds)
        for leg in ringing:
            await self._quietly(channel.hang_up(leg))
        await runtime.assignment.dispatch()  # capacity may have been freed

    async def _leg(
        self, channel: CallChannel, event: LegRinging | LegAnswered | LegEnded | LegFailed
    ) -> None:
        tag, leg = event.tag, event.leg_id
        cid, agent_id, offer_id = tag.conversation_id, tag.agent_id, tag.offer_id
        if cid is None or agent_id is None or not leg:
            return  # a supervisor listening in, or not one of ours: nothing to record
        db = self.runtime.db
        if offer_id is None:  # a call back's agent leg: only its end is news
            if isinstance(event, LegEnded):
                await db.write(leg_ended, cid, agent_id, leg, event.seconds)
            return
        match event:
            case LegAnswered():
                result = await db.write(leg_answered, offer_id, leg)
                if result.get("hangup"):
                    await self._quietly(channel.hang_up(leg))
                for other in result.get("remove", []):
                    await self._quietly(channel.remove_leg(cid, other))
            case LegRinging():
                await db.write(note_ringing, cid, offer_id, leg)
            case LegFailed(why=why):
                if await db.write(leg_failed, offer_id, f"phone {why}"):
                    await self.runtime.assignment.dispatch()
            case LegEnded(seconds=seconds):
                # answered and hung up; never answered as far as we know (its "answered"
                # never came): the offer ends like a leg that failed
                if await db.write(leg_failed, offer_id, "phone completed"):
                    await self.runtime.assignment.dispatch()
                else:
                    await db.write(leg_ended, cid, agent_id, leg, seconds)

    async def _quietly(self, action: Any) -> None:
        try:
            await action
        except (TemporarySendError, PermanentSendError) as exc:
            log.warning("a call action failed: %s", exc.reason)

    # -- the assignment's hook ------------------------------------------------------------
    async def connect(self, accepted: dict[str, Any]) -> None:
        """After an accepted call offer committed: ring the agent's phone into the call."""
        cid, offer_id = int(accepted["conversation_id"]), int(accepted["offer_id"])
        connect = accepted["connect"]
        inbox_id = await self.runtime.db.read(
            lambda c: c.execute(
                select(Conversation.inbox_id).where(Conversation.id == cid)
            ).scalar_one()
        )
        channel = self._channel_of(int(inbox_id))
        try:
            if channel is None:
                raise PermanentSendError("the call's inbox is not a phone inbox")
            leg = await channel.ring_agent(
                cid,
                connect["to"],
                timeout=connect["timeout"],
                tag=LegTag(cid, offer_id, connect["agent_id"]),
            )
        except (TemporarySendError, PermanentSendError) as exc:
            log.warning(
                "could not ring agent %s for call %s: %s", connect["agent_id"], cid, exc.reason
            )
            if await self.runtime.db.write(leg_failed, offer_id, f"phone not called: {exc.reason}"):
                await self.runtime.assignment.dispatch()
            return
        await self.runtime.db.write(note_ringing, cid, offer_id, leg)

    async def call_back(self, agent_id: int, conversation_id: int) -> dict[str, str]:
        """The agent calls the customer back: the customer is called into the conversation's
        room and the agent's phone is rung into it too."""
        db = self.runtime.db
        plan = await db.write(calling_back, agent_id, conversation_id)
        channel = self._channel_of(int(plan["inbox_id"]))
        if channel is None:
            raise Conflict("the conversation's inbox is not a phone inbox")
        leg = await channel.ring_agent(
            conversation_id,
            plan["agent_phone"],
            timeout=30,
            tag=LegTag(conversation_id, None, agent_id),
        )
        try:
            customer = await channel.call_back(conversation_id, plan["customer"])
        except (TemporarySendError, PermanentSendError):
            await self._quietly(channel.hang_up(leg))
            raise
        await db.write(called_back, agent_id, conversation_id, customer, leg)
        return {"customer_call": customer, "agent_leg": leg}

    async def monitor(self, conversation_id: int, to: str) -> str:
        """A supervisor listens in, muted."""
        inbox_id = await self.runtime.db.read(
            lambda c: c.execute(
                select(Conversation.inbox_id).where(Conversation.id == conversation_id)
            ).scalar_one_or_none()
        )
        channel = self._channel_of(int(inbox_id)) if inbox_id is not None else None
        if channel is None:
            raise PermanentSendError("not a phone conversation")
        return await channel.ring_agent(
            conversation_id, to, timeout=30, tag=LegTag(monitor=True), muted=True
        )
