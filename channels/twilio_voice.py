"""Phone calls through Twilio Programmable Voice: signed webhooks, TwiML, the Conference API.

A caller is never lost: they wait in a conference of their own (``conv-<id>``) that only
starts when an agent's phone leg joins; an agent's leg that is not answered leaves the
caller waiting for the next agent. The core decides (``router/calls.py``, through the call
contract of :mod:`channels.calls`); this module speaks Twilio: it verifies the webhooks and
parses them into call events, renders the core's answers as TwiML and calls the REST API.

Webhooks (``POST``, form-encoded, signed with ``X-Twilio-Signature``), all under
``{public_base_url}/webhooks/twilio/{inbox}/``:

* ``voice``: an incoming call (set it as the number's "A call comes in" URL);
* ``voice-status``: the caller's call status (the number's "Call status changes" URL):
  a hang-up before an agent answered is an abandoned call;
* ``voice-gather``: the caller's IVR choice (DTMF);
* ``hold``: the conference's wait URL (our own queue position and estimated wait);
* ``voicemail``: the voicemail prompt and ``<Record>``;
* ``participant-status``: an agent's phone leg (answered, no-answer, busy, failed);
* ``recording`` and ``transcription``: a voicemail's audio and its transcript, which
  become messages of the conversation (the audio fetched from Twilio's media host only).

Configuration (channels.yaml)::

    support-phone:
      channel: voice
      provider: twilio
      account_sid: AC0123456789abcdef0123456789abcdef
      auth_token: "${TWILIO_AUTH_TOKEN}"
      number: "+15550000000"                # the number callers dial (caller ID of agent legs)
      ivr: {prompt: "For billing press 1, for anything else press 2.", timeout: 5}
      hold_music: https://com.twilio.music.classical.s3.amazonaws.com/BusyStrings.mp3
      language: en-US
      voicemail_max_seconds: 120
      transcribe: true

The queue's ``voicemail_after`` (rules.yaml) says when a waiting caller is offered
voicemail; out of the queue's hours callers go to voicemail at once.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal
from urllib.parse import urlencode, urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.twiml.voice_response import Dial, Gather, VoiceResponse

from channels.base import (
    Attachment,
    ChannelContext,
    InboundMessage,
    InboxConfig,
    OutboundMessage,
    ParsedItem,
    PermanentSendError,
    Sender,
    SendReceipt,
    TemporarySendError,
    WebhookRequest,
    WebhookResponse,
)
from channels.calls import (
    ENDED,
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
from channels.safe_fetch import MediaRefused, fetch_media
from channels.twilio_sms import (
    EMPTY_TWIML,
    TwilioAccountConfig,
    TwilioChannel,
    normalize_e164,
    twilio_client,
    verify_twilio,
)

__all__ = [
    "VOICE_KINDS",
    "TwilioVoiceChannel",
    "TwilioVoiceConfig",
    "conference_name",
]

log = logging.getLogger(__name__)

# The webhooks that carry call events (the core answers them, through ``answer``) and the
# ones that go through the generic path (verify, parse, persist, acknowledge).
VOICE_KINDS = frozenset(
    {"voice", "voice-gather", "voice-status", "hold", "voicemail", "participant-status"}
)
MESSAGE_KINDS = frozenset({"recording", "transcription"})
# Twilio's stand-ins for a withheld caller ID
_ANONYMOUS = frozenset({"anonymous", "restricted", "unknown", "+266696687", "+86282452253"})
# a participant's CallStatus: the leg rings, or it was answered
_LEG_RINGING = frozenset({"initiated", "ringing", "queued"})
_LEG_ANSWERED = frozenset({"in-progress", "answered"})
_GONE = "20404"  # Twilio: the resource (call, participant) does not exist (any more)


def conference_name(conversation_id: int) -> str:
    return f"conv-{conversation_id}"


class IvrConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=1000)
    timeout: int = Field(5, ge=1, le=30)  # seconds to wait for a key
    digits: int = Field(1, ge=1, le=4)


class TwilioVoiceConfig(TwilioAccountConfig):
    """The keys of a ``channel: voice, provider: twilio`` inbox in channels.yaml."""

    channel: Literal["voice"] = "voice"
    provider: Literal["twilio"] = "twilio"
    # a call joins the caller's open phone conversation, not their open email or chat
    continuity: Literal["join_open", "per_channel"] = "per_channel"
    number: str
    ivr: IvrConfig | None = None
    language: str = Field("en-US", pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
    hold_music: str = "https://com.twilio.music.classical.s3.amazonaws.com/BusyStrings.mp3"
    announce_position: bool = True
    voicemail_prompt: str = Field(
        "Nobody is free to take your call. Please leave a message after the tone "
        "and we will call you back.",
        min_length=1,
        max_length=1000,
    )
    voicemail_max_seconds: int = Field(120, ge=5, le=3600)
    transcribe: bool = True
    recording_max_mb: int = Field(20, ge=1, le=200)

    @field_validator("number")
    @classmethod
    def _e164(cls, value: str) -> str:
        normalized = normalize_e164(value)
        if normalized != value:
            raise ValueError(f"number must be E.164 like {normalized}")
        return value

    @field_validator("hold_music")
    @classmethod
    def _https(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("hold_music must be an http(s) URL")
        return value


class TwilioVoiceChannel(TwilioChannel, CallChannel):
    """Voice over Twilio: the call contract (:mod:`channels.calls`) in Twilio's terms."""

    channel_id = "voice"
    provider = "twilio"
    channel_ids = ("voice",)
    config_model: ClassVar[type[InboxConfig]] = TwilioVoiceConfig
    webhook = True
    webhook_kinds = VOICE_KINDS | MESSAGE_KINDS
    call_kinds = VOICE_KINDS

    def __init__(self, slug: str, config: InboxConfig, context: ChannelContext) -> None:
        super().__init__(slug, config, context)
        assert isinstance(config, TwilioVoiceConfig)
        self.voice_config = config

    # -- URLs -------------------------------------------------------------------------
    def url(self, kind: str, **query: Any) -> str:
        """Our webhook ``kind``'s public URL (the query is covered by Twilio's signature)."""
        base = self.context.public_base_url.rstrip("/")
        tail = f"?{urlencode({k: v for k, v in query.items() if v is not None})}" if query else ""
        return f"{base}/webhooks/twilio/{self.slug}/{kind}{tail}"

    @staticmethod
    def kind(request: WebhookRequest) -> str:
        return urlsplit(request.url).path.rstrip("/").rsplit("/", 1)[-1]

    # -- inbound ----------------------------------------------------------------------
    def verify(self, request: WebhookRequest) -> bool:
        return verify_twilio(self.voice_config.auth_token, request)

    @staticmethod
    def caller(form: dict[str, str] | Any, fallback: str | None = None) -> Sender:
        """The caller as an identity: E.164 (one number is one customer across SMS, voice
        and WhatsApp). Caller ID is easy to spoof: it is verified only when the carrier
        attested it fully (STIR/SHAKEN ``StirVerstat`` ``TN-Validation-Passed-A``); else it
        is an unverified claim, kept apart from the number's verified owner. A withheld
        number is an unverified identity of this call only."""
        raw = (form.get("From") or fallback or "").strip()
        if raw.lower() in _ANONYMOUS or not raw:
            return Sender("phone", f"anonymous:{form.get('CallSid', '')}", verified=False)
        try:
            attested = form.get("StirVerstat") == "TN-Validation-Passed-A"
            return Sender(
                "phone",
                normalize_e164(raw),
                verified=attested,
                verified_by="stir_shaken_a" if attested else None,
            )
        except ValueError:
            return Sender("phone", f"anonymous:{form.get('CallSid', '')}", verified=False)

    def call_message(
        self, request: WebhookRequest, ivr_choice: str | None = None
    ) -> InboundMessage:
        """The message an incoming call becomes (its id is the CallSid: a retried webhook
        or the IVR's second request joins the same message)."""
        form = request.form
        data: dict[str, Any] = {"call_sid": form.get("CallSid"), "call": "inbound"}
        if ivr_choice is not None:
            data["ivr_choice"] = ivr_choice
        if form.get("StirVerstat"):
            data["stir_verstat"] = form["StirVerstat"]
        return InboundMessage(
            external_id=str(form.get("CallSid") or ""),
            sender=self.caller(form),
            text="Phone call",
            no_auto_reply=True,  # a caller is answered by voice, never by an automatic text
            data=data,
        )

    def parse(self, request: WebhookRequest) -> list[ParsedItem]:
        """Recordings and transcripts as messages; ``[]`` for the calls' own webhooks (the
        core handles those) and for anything not finished."""
        kind = self.kind(request)
        form = request.form
        sender = self.caller(form, request.query.get("from"))
        if kind == "recording" and form.get("RecordingSid"):
            if form.get("RecordingStatus", "completed") != "completed":
                return []
            sid = form["RecordingSid"]
            seconds = form.get("RecordingDuration") or "0"
            url = form.get("RecordingUrl") or ""
            return [
                InboundMessage(
                    external_id=sid,
                    sender=sender,
                    text=f"Voicemail ({seconds} s)",
                    attachments=[
                        Attachment(f"voicemail-{sid}.wav", "audio/wav", 0, url=f"{url}.wav")
                    ]
                    if url
                    else [],
                    no_auto_reply=True,
                    data={
                        "voicemail": True,
                        "call_sid": form.get("CallSid"),
                        "recording_sid": sid,
                        "duration": seconds,
                    },
                )
            ]
        if kind == "transcription" and form.get("TranscriptionSid"):
            if form.get("TranscriptionStatus", "completed") != "completed":
                return []
            return [
                InboundMessage(
                    external_id=form["TranscriptionSid"],
                    sender=sender,
                    text=f"Voicemail transcript: {form.get('TranscriptionText', '').strip()}",
                    no_auto_reply=True,
                    data={
                        "transcript_of": form.get("RecordingSid"),
                        "call_sid": form.get("CallSid"),
                    },
                )
            ]
        return []

    async def parse_async(self, request: WebhookRequest) -> list[ParsedItem]:
        items = self.parse(request)
        for item in items:
            if isinstance(item, InboundMessage) and item.attachments:
                item.attachments = [await self._fetch(a, item) for a in item.attachments]
        return items

    async def _fetch(self, attachment: Attachment, message: InboundMessage) -> Attachment:
        """A recording from Twilio's media host only, into the blob store; on failure the
        message keeps the URL and says why (nothing is lost: Twilio keeps the recording)."""
        cfg = self.voice_config
        if attachment.url is None or self.context.blobs is None:
            return attachment
        auth_host = urlsplit(cfg.api_base_url).hostname if cfg.api_base_url else None
        try:
            data, content_type = await fetch_media(
                attachment.url,
                allowed_hosts=cfg.media_hosts,
                max_bytes=cfg.recording_max_mb * 1024 * 1024,
                allowed_types=["audio/*"],
                auth=(cfg.account_sid, cfg.auth_token.get_secret_value()),
                auth_host=auth_host or "api.twilio.com",
                client=self.media_client,
                allow_insecure=cfg.allow_insecure_media_for_tests,
                resolver=self.media_resolver,
                timeout=max(cfg.request_timeout, 20.0),
            )
            key = await self.context.blobs.put(data, content_type, attachment.filename)
        except (MediaRefused, Exception) as exc:
            reason = exc.reason if isinstance(exc, MediaRefused) else f"{type(exc).__name__}"
            log.warning("recording of inbox %s not stored: %s", self.slug, reason)
            message.data["media_errors"] = [{"url": attachment.url, "reason": reason}]
            return attachment
        return Attachment(attachment.filename, content_type, len(data), blob_key=key)

    def ack(self, request: WebhookRequest) -> WebhookResponse:
        return WebhookResponse(200, EMPTY_TWIML, "text/xml")

    # -- call events --------------------------------------------------------------------
    @property
    def has_menu(self) -> bool:
        return self.voice_config.ivr is not None

    def call_event(self, kind: str, request: WebhookRequest) -> CallEvent | None:
        """The call event of a verified webhook: the kinds are our URLs (the numbers'
        "A call comes in" and "Call status changes", and those we hand Twilio in TwiML or
        API calls, with the conversation, offer and agent in their query)."""
        form, query = request.form, request.query
        status = form.get("CallStatus", "")
        if kind == "voice":
            return CallArrived(self.call_message(request))
        if kind == "voice-gather":
            choice = form.get("Digits") or None
            return ChoiceMade(self.call_message(request, choice), choice)
        if kind == "hold":
            return HoldTurn(_int(query.get("conversation")))
        if kind == "voicemail":
            if query.get("done"):
                return VoicemailLeft()
            caller = query.get("from") or self.caller(form).address
            return VoicemailReached(_int(query.get("conversation")), caller)
        if kind == "voice-status":
            call_sid = form.get("CallSid", "")
            if status not in ENDED or not call_sid:
                return None
            return CallEnded(
                call_sid,
                status,
                form.get("CallDuration"),
                _int(query.get("conversation")),
                self.call_message(request),
            )
        if kind == "participant-status":
            tag = LegTag(
                _int(query.get("conversation")),
                _int(query.get("offer")),
                _int(query.get("agent")),
                bool(query.get("monitor")),
            )
            leg = form.get("CallSid", "")
            if status in _LEG_ANSWERED:
                return LegAnswered(tag, leg)
            if status in _LEG_RINGING:
                return LegRinging(tag, leg)
            if status == "completed":
                return LegEnded(tag, leg, form.get("CallDuration") or "0")
            if status in ENDED:
                return LegFailed(tag, leg, status)
        return None

    def answer(self, answer: CallAnswer) -> WebhookResponse:
        """The core's answer as TwiML."""
        match answer:
            case Menu():
                body = self.ivr_twiml()
            case WaitForAgent(conversation_id):
                body = self.conference_twiml(conversation_id)
            case OnHold(position, estimated_wait):
                body = self.hold_twiml(position, estimated_wait)
            case RecordVoicemail(conversation_id, caller):
                body = self.voicemail_twiml(conversation_id, caller)
            case HangUp(text):
                body = self.goodbye_twiml() if text is None else self.goodbye_twiml(text)
            case StandBy():
                body = self.pause_twiml()
            case Acknowledge():
                body = EMPTY_TWIML
        return WebhookResponse(200, body, "text/xml")

    # -- TwiML ------------------------------------------------------------------------
    def _say(self, response: VoiceResponse | Gather, text: str) -> None:
        response.say(text, language=self.voice_config.language)

    def ivr_twiml(self, conversation_query: dict[str, Any] | None = None) -> bytes:
        """Ask for the IVR choice; no key pressed goes on without one."""
        ivr = self.voice_config.ivr
        assert ivr is not None
        action = self.url("voice-gather", **(conversation_query or {}))
        response = VoiceResponse()
        gather = Gather(num_digits=ivr.digits, action=action, method="POST", timeout=ivr.timeout)
        self._say(gather, ivr.prompt)
        response.append(gather)
        response.redirect(action, method="POST")
        return str(response).encode()

    def conference_twiml(self, conversation_id: int) -> bytes:
        """The caller waits alone in their conversation's conference (it starts when an
        agent joins; it ends when the caller leaves), hearing our hold URL."""
        response = VoiceResponse()
        dial = Dial()
        dial.conference(
            conference_name(conversation_id),
            start_conference_on_enter=False,
            end_conference_on_exit=True,
            wait_url=self.url("hold", conversation=conversation_id),
            wait_method="POST",
            beep=False,
        )
        response.append(dial)
        return str(response).encode()

    def hold_twiml(self, position: int | None, wait_seconds: float | None) -> bytes:
        """Our own queue position and estimated wait, then a turn of music (Twilio asks
        again when it ends)."""
        response = VoiceResponse()
        if self.voice_config.announce_position and position is not None:
            text = f"You are number {position} in the queue."
            if wait_seconds is not None:
                minutes = max(1, round(wait_seconds / 60))
                text += (
                    f" The estimated wait is about {minutes} minute{'s' if minutes > 1 else ''}."
                )
            self._say(response, text)
        response.play(self.voice_config.hold_music)
        return str(response).encode()

    def voicemail_twiml(self, conversation_id: int, caller: str) -> bytes:
        cfg = self.voice_config
        query = {"conversation": conversation_id, "from": caller}
        response = VoiceResponse()
        self._say(response, cfg.voicemail_prompt)
        record: dict[str, Any] = {
            "max_length": cfg.voicemail_max_seconds,
            "play_beep": True,
            "action": self.url("voicemail", done=1, **query),
            "method": "POST",
            "recording_status_callback": self.url("recording", **query),
            "recording_status_callback_event": "completed",
            "recording_status_callback_method": "POST",
        }
        if cfg.transcribe:
            record["transcribe"] = True
            record["transcribe_callback"] = self.url("transcription", **query)
        response.record(**record)
        return str(response).encode()

    def goodbye_twiml(self, text: str = "Thank you. Goodbye.") -> bytes:
        response = VoiceResponse()
        self._say(response, text)
        response.hangup()
        return str(response).encode()

    @staticmethod
    def pause_twiml(seconds: int = 1) -> bytes:
        response = VoiceResponse()
        response.pause(length=seconds)
        return str(response).encode()

    # -- the REST API -----------------------------------------------------------------
    def _client(self) -> Any:
        return twilio_client(self.voice_config, self._pool(self.voice_config.request_timeout))[0]

    async def _api(self, what: str, call: Any) -> Any:
        try:
            return await call
        except TwilioRestException as exc:
            if exc.status == 429 or exc.status >= 500:
                raise TemporarySendError(f"{what}: Twilio {exc.status} {exc.code}") from exc
            raise PermanentSendError(
                f"{what}: Twilio {exc.code}: {exc.msg}", str(exc.code)
            ) from exc
        except (TwilioException, httpx.HTTPError) as exc:
            raise TemporarySendError(f"{what}: {type(exc).__name__}: {exc}") from exc

    async def ring_agent(
        self, conversation_id: int, to: str, *, timeout: int, tag: LegTag, muted: bool = False
    ) -> str:
        """Ring ``to`` (E.164 or a SIP URI) into the conversation's conference; its
        progress is posted to ``participant-status`` with the tag in the query. Returns the
        leg's CallSid."""
        status_query: dict[str, Any] = (
            {"monitor": 1}
            if tag.monitor
            else {"conversation": tag.conversation_id, "offer": tag.offer_id, "agent": tag.agent_id}
        )
        client = self._client()
        participant = await self._api(
            "add the agent's phone",
            client.conferences(conference_name(conversation_id)).participants.create_async(
                from_=self.voice_config.number,
                to=to,
                timeout=timeout,
                status_callback=self.url("participant-status", **status_query),
                status_callback_method="POST",
                status_callback_event=["ringing", "answered", "completed"],
                start_conference_on_enter=not muted,
                end_conference_on_exit=False,
                muted=muted,
                early_media=True,
                beep="false",
            ),
        )
        return str(participant.call_sid)

    async def remove_leg(self, conversation_id: int, call_sid: str) -> None:
        """Take a leg out of the conference (gone already is fine)."""
        client = self._client()
        try:
            await self._api(
                "remove a phone leg",
                client.conferences(conference_name(conversation_id))
                .participants(call_sid)
                .delete_async(),
            )
        except PermanentSendError as exc:
            if exc.code != _GONE:
                raise

    async def send_to_voicemail(self, call_id: str, conversation_id: int, caller: str) -> None:
        """Redirect the holding caller's call (out of the conference's wait URL) to our
        ``voicemail`` webhook."""
        url = self.url("voicemail", conversation=conversation_id, **{"from": caller or None})
        await self._api(
            "redirect the call", self._client().calls(call_id).update_async(url=url, method="POST")
        )

    async def hang_up(self, call_sid: str) -> None:
        try:
            await self._api(
                "hang up", self._client().calls(call_sid).update_async(status="completed")
            )
        except PermanentSendError as exc:
            if exc.code != _GONE:
                raise

    async def call_back(self, conversation_id: int, to: str) -> str:
        """Call the customer back into the conversation's conference (the agent's leg is
        added as for an incoming call). Returns the customer's CallSid."""
        response = VoiceResponse()
        dial = Dial()
        dial.conference(
            conference_name(conversation_id),
            start_conference_on_enter=True,
            end_conference_on_exit=True,
            beep=False,
        )
        response.append(dial)
        call = await self._api(
            "call the customer back",
            self._client().calls.create_async(
                to=to,
                from_=self.voice_config.number,
                twiml=str(response),
                status_callback=self.url("voice-status", conversation=conversation_id),
                status_callback_method="POST",
            ),
        )
        return str(call.sid)

    async def send(self, message: OutboundMessage) -> SendReceipt:
        raise PermanentSendError(
            "a phone call carries no text: call the customer back or answer by SMS",
            code="voice_text",
        )


def _int(value: Any) -> int | None:
    """A number from our own URLs' query (anything else: None)."""
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
