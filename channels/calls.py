"""The call contract: what a voice channel tells the core about a call, and what the core
asks of it. The core (``router/calls.py``) keeps the conversation's side (who is waiting,
which agent's phone rings, abandonment, voicemail); the channel keeps the provider's
(its webhooks, its call-control language, its REST API).

Three parts:

* **Events**: :meth:`CallChannel.call_event` turns one of the channel's call webhooks into
  a :data:`CallEvent` (or None: nothing the core needs to hear, e.g. "ringing").
* **Answers**: the core answers each call webhook with a :data:`CallAnswer`, which
  :meth:`CallChannel.answer` renders as the provider expects it (TwiML for Twilio).
* **Actions**: what the core asks of the provider between webhooks (ring an agent's phone
  into the caller's call, take a leg out, hang up, move the caller to voicemail, call a
  customer back). They raise :class:`~channels.base.TemporarySendError` or
  :class:`~channels.base.PermanentSendError` like sends do.

The words used throughout: a *call* is the customer's; a *leg* is an agent's (or a
supervisor's) phone brought into it; the caller waits in their conversation's *room*
(Twilio: a conference), which an agent's leg joins. Ids are the provider's (Twilio's
CallSid), opaque to the core.

Statuses are the usual telephony words: a call or leg ends ``completed`` (it was answered
and hung up) or ``busy``, ``no-answer``, ``failed``, ``canceled``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from channels.base import Channel, InboundMessage, WebhookRequest, WebhookResponse

__all__ = [
    "ENDED",
    "Acknowledge",
    "CallAnswer",
    "CallArrived",
    "CallChannel",
    "CallEnded",
    "CallEvent",
    "ChoiceMade",
    "HangUp",
    "HoldTurn",
    "LegAnswered",
    "LegEnded",
    "LegFailed",
    "LegRinging",
    "LegTag",
    "Menu",
    "OnHold",
    "RecordVoicemail",
    "StandBy",
    "VoicemailLeft",
    "VoicemailReached",
    "WaitForAgent",
]

#: How a call or a leg can end.
ENDED = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})


# -- events: what the channel parsed from a call webhook --------------------------------
@dataclass(frozen=True, slots=True)
class CallArrived:
    """A call came in. ``message`` is what the call becomes in the conversation: its
    ``external_id`` is the call's id (a retried webhook carries the same), its sender the
    caller."""

    message: InboundMessage


@dataclass(frozen=True, slots=True)
class ChoiceMade:
    """The caller answered the menu (:class:`Menu`); ``choice`` is None when they pressed
    nothing in time. ``message`` carries the choice too (``data["ivr_choice"]``)."""

    message: InboundMessage
    choice: str | None


@dataclass(frozen=True, slots=True)
class HoldTurn:
    """The caller's hold asks what comes next (once per turn of hold music)."""

    conversation_id: int | None


@dataclass(frozen=True, slots=True)
class VoicemailReached:
    """The caller, moved by :meth:`CallChannel.send_to_voicemail`, reached the voicemail."""

    conversation_id: int | None
    caller: str


@dataclass(frozen=True, slots=True)
class VoicemailLeft:
    """The caller finished their voicemail (the recording comes later, as a message)."""


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The caller's call is over: ``status`` one of :data:`ENDED`, ``seconds`` as the
    provider reported them. ``conversation_id`` when the call's own URLs name it (a call
    back); ``message`` is what the call becomes if it was never stored (the caller hung
    up in the menu: still a call that came in, and was missed)."""

    call_id: str
    status: str
    seconds: str | None
    conversation_id: int | None
    message: InboundMessage


@dataclass(frozen=True, slots=True)
class LegTag:
    """What the core tags a leg with when it rings it (:meth:`CallChannel.ring_agent`);
    the channel hands the tag back with every event of that leg. ``offer_id`` is None for
    a call back's agent leg; ``monitor`` marks a supervisor listening in."""

    conversation_id: int | None = None
    offer_id: int | None = None
    agent_id: int | None = None
    monitor: bool = False


@dataclass(frozen=True, slots=True)
class LegRinging:
    tag: LegTag
    leg_id: str


@dataclass(frozen=True, slots=True)
class LegAnswered:
    tag: LegTag
    leg_id: str


@dataclass(frozen=True, slots=True)
class LegEnded:
    """An answered leg hung up (``completed``) after ``seconds``."""

    tag: LegTag
    leg_id: str
    seconds: str


@dataclass(frozen=True, slots=True)
class LegFailed:
    """The leg never connected: ``why`` is ``busy``, ``no-answer``, ``failed`` or
    ``canceled``."""

    tag: LegTag
    leg_id: str
    why: str


CallEvent = (
    CallArrived
    | ChoiceMade
    | HoldTurn
    | VoicemailReached
    | VoicemailLeft
    | CallEnded
    | LegRinging
    | LegAnswered
    | LegEnded
    | LegFailed
)


# -- answers: what the core says to a call webhook --------------------------------------
@dataclass(frozen=True, slots=True)
class Menu:
    """Ask the caller to choose (the inbox's menu prompt); the choice comes back as
    :class:`ChoiceMade`."""


@dataclass(frozen=True, slots=True)
class WaitForAgent:
    """The caller waits in their conversation's room, alone until an agent's leg joins (it
    ends when the caller leaves); their hold asks for each turn (:class:`HoldTurn`)."""

    conversation_id: int


@dataclass(frozen=True, slots=True)
class OnHold:
    """One turn of the hold: the caller's place in the queue and the estimated wait when
    known, then hold music."""

    position: int | None
    estimated_wait: float | None  # seconds


@dataclass(frozen=True, slots=True)
class RecordVoicemail:
    """The voicemail prompt, then record (and transcribe, when the inbox does); the
    recording and transcript arrive as messages of the conversation."""

    conversation_id: int
    caller: str


@dataclass(frozen=True, slots=True)
class HangUp:
    """Say ``text`` (None: the inbox's goodbye) and end the call."""

    text: str | None = None


@dataclass(frozen=True, slots=True)
class StandBy:
    """A moment of silence: the call is being moved elsewhere (to voicemail)."""


@dataclass(frozen=True, slots=True)
class Acknowledge:
    """Nothing to say: the webhook is answered and the call goes on as it was."""


CallAnswer = Menu | WaitForAgent | OnHold | RecordVoicemail | HangUp | StandBy | Acknowledge


# -- the channel's side -------------------------------------------------------------------
class CallChannel(Channel, ABC):
    """A channel that carries phone calls. ``call_kinds`` are the webhook kinds (the last
    segment of ``/webhooks/{provider}/{inbox}/{kind}``) that carry call events; the
    channel's other kinds (a voicemail's recording) take the message path (``parse``)."""

    call_kinds: ClassVar[frozenset[str]] = frozenset()

    @property
    @abstractmethod
    def has_menu(self) -> bool:
        """Whether a caller chooses from a menu (:class:`Menu`) before the call is stored."""

    @abstractmethod
    def call_event(self, kind: str, request: WebhookRequest) -> CallEvent | None:
        """The event of a verified call webhook of ``kind``; None when there is nothing for
        the core to do (a status that changes nothing)."""

    @abstractmethod
    def answer(self, answer: CallAnswer) -> WebhookResponse:
        """``answer`` as the provider expects it in the webhook's response."""

    @abstractmethod
    async def ring_agent(
        self, conversation_id: int, to: str, *, timeout: int, tag: LegTag, muted: bool = False
    ) -> str:
        """Ring ``to`` (E.164 or a SIP URI) for ``timeout`` seconds into the conversation's
        room; its events come back with ``tag``. ``muted``: listen only. Returns the leg's
        id."""

    @abstractmethod
    async def remove_leg(self, conversation_id: int, leg_id: str) -> None:
        """Take a leg out of the conversation's room (gone already is fine)."""

    @abstractmethod
    async def hang_up(self, call_id: str) -> None:
        """End a call or a leg (ended already is fine)."""

    @abstractmethod
    async def send_to_voicemail(self, call_id: str, conversation_id: int, caller: str) -> None:
        """Move a holding caller to the voicemail (:class:`VoicemailReached` follows)."""

    @abstractmethod
    async def call_back(self, conversation_id: int, to: str) -> str:
        """Call the customer ``to`` into the conversation's room; returns the call's id (its
        end comes as :class:`CallEnded` naming the conversation)."""
