"""The call contract in Twilio's terms: which webhook becomes which call event, and how the
core's answers read as TwiML. The flows themselves (against the fake Twilio, through the
core) are in tests/router/test_voice.py."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from channels import channel_class
from channels.base import ChannelContext, WebhookRequest
from channels.calls import (
    Acknowledge,
    CallArrived,
    CallChannel,
    CallEnded,
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
from channels.twilio_voice import TwilioVoiceChannel, TwilioVoiceConfig

PUBLIC = "https://omni.example.com"
SID = "CA" + "1" * 32
LEG = "CA" + "2" * 32
CALLER = "+14155550100"


def channel(**extra: Any) -> TwilioVoiceChannel:
    config = TwilioVoiceConfig(
        account_sid="AC" + "0" * 32, auth_token="t" * 32, number="+15550000000", **extra
    )
    context = ChannelContext(slug="phone", public_base_url=PUBLIC, now=lambda: datetime.now(UTC))
    return TwilioVoiceChannel("phone", config, context)


def hook(kind: str, form: dict[str, str], **query: Any) -> WebhookRequest:
    tail = f"?{urlencode(query)}" if query else ""
    return WebhookRequest(
        "POST",
        f"{PUBLIC}/webhooks/twilio/phone/{kind}{tail}",
        {},
        urlencode(form).encode(),
        query={k: str(v) for k, v in query.items()},
        form=form,
    )


def call(status: str = "ringing", sid: str = SID, **extra: str) -> dict[str, str]:
    return {"CallSid": sid, "CallStatus": status, "From": CALLER, **extra}


def test_it_is_the_registered_voice_channel_and_a_call_channel() -> None:
    assert channel_class("voice", "twilio") is TwilioVoiceChannel
    assert issubclass(TwilioVoiceChannel, CallChannel)
    assert TwilioVoiceChannel.call_kinds < TwilioVoiceChannel.webhook_kinds
    assert TwilioVoiceChannel.webhook_kinds - TwilioVoiceChannel.call_kinds == {
        "recording",
        "transcription",
    }


def test_incoming_calls_and_menu_choices() -> None:
    phone = channel()
    arrived = phone.call_event("voice", hook("voice", call()))
    assert isinstance(arrived, CallArrived)
    assert (arrived.message.external_id, arrived.message.sender.address) == (SID, CALLER)
    assert arrived.message.no_auto_reply and "ivr_choice" not in arrived.message.data
    chose = phone.call_event("voice-gather", hook("voice-gather", call(Digits="1")))
    assert isinstance(chose, ChoiceMade) and chose.choice == "1"
    assert chose.message.data["ivr_choice"] == "1"
    silent = phone.call_event("voice-gather", hook("voice-gather", call()))
    assert isinstance(silent, ChoiceMade) and silent.choice is None
    assert not phone.has_menu and channel(ivr={"prompt": "Press 1."}).has_menu


def test_hold_voicemail_and_the_callers_end() -> None:
    phone = channel()
    assert phone.call_event("hold", hook("hold", call(), conversation=7)) == HoldTurn(7)
    assert phone.call_event("hold", hook("hold", call())) == HoldTurn(None)
    reached = phone.call_event("voicemail", hook("voicemail", call(), conversation=7))
    assert reached == VoicemailReached(7, CALLER)
    named = hook("voicemail", call(), conversation=7, **{"from": "+14155550111"})
    assert phone.call_event("voicemail", named) == VoicemailReached(7, "+14155550111")
    done = hook("voicemail", call(), conversation=7, done=1)
    assert phone.call_event("voicemail", done) == VoicemailLeft()
    # the caller's call: only its end is news
    assert phone.call_event("voice-status", hook("voice-status", call("in-progress"))) is None
    ended = phone.call_event(
        "voice-status", hook("voice-status", call("completed", CallDuration="42"), conversation=3)
    )
    assert isinstance(ended, CallEnded)
    assert (ended.call_id, ended.status, ended.seconds, ended.conversation_id) == (
        SID,
        "completed",
        "42",
        3,
    )
    assert ended.message.external_id == SID
    no_sid = hook("voice-status", {"CallStatus": "completed"})
    assert phone.call_event("voice-status", no_sid) is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("initiated", LegRinging),
        ("ringing", LegRinging),
        ("queued", LegRinging),
        ("in-progress", LegAnswered),
        ("answered", LegAnswered),
        ("completed", LegEnded),
        ("no-answer", LegFailed),
        ("busy", LegFailed),
        ("failed", LegFailed),
        ("canceled", LegFailed),
        ("something-new", type(None)),
    ],
)
def test_an_agents_leg_carries_its_tag(status: str, expected: type) -> None:
    form = call(status, LEG, CallDuration="12")
    event = channel().call_event(
        "participant-status", hook("participant-status", form, conversation=3, offer=5, agent=9)
    )
    assert isinstance(event, expected)
    if event is not None:
        assert isinstance(event, LegRinging | LegAnswered | LegEnded | LegFailed)
        assert (event.tag, event.leg_id) == (LegTag(3, 5, 9), LEG)
    if isinstance(event, LegFailed):
        assert event.why == status
    if isinstance(event, LegEnded):
        assert event.seconds == "12"


def twiml(body: bytes) -> ET.Element:
    root = ET.fromstring(body)
    assert root.tag == "Response"
    return root


def test_the_answers_as_twiml() -> None:
    phone = channel(ivr={"prompt": "For billing press 1.", "timeout": 4})
    for answer in (Menu(), WaitForAgent(7), OnHold(2, 300.0), RecordVoicemail(7, CALLER)):
        response = phone.answer(answer)
        assert (response.status, response.content_type) == (200, "text/xml")
    gather = twiml(phone.answer(Menu()).body).find("Gather")
    assert gather is not None and gather.findtext("Say") == "For billing press 1."
    assert (gather.get("action") or "").endswith("/webhooks/twilio/phone/voice-gather")
    conference = twiml(phone.answer(WaitForAgent(7)).body).find("./Dial/Conference")
    assert conference is not None and conference.text == "conv-7"
    assert conference.get("waitUrl") == f"{PUBLIC}/webhooks/twilio/phone/hold?conversation=7"
    hold = twiml(phone.answer(OnHold(2, 300.0)).body)
    assert hold.findtext("Say") == (
        "You are number 2 in the queue. The estimated wait is about 5 minutes."
    )
    assert hold.find("Play") is not None
    assert twiml(phone.answer(OnHold(None, None)).body).find("Say") is None
    record = twiml(phone.answer(RecordVoicemail(7, CALLER)).body).find("Record")
    assert record is not None and record.get("transcribe") == "true"
    callback = urlsplit(record.get("recordingStatusCallback") or "")
    assert callback.path == "/webhooks/twilio/phone/recording"
    assert parse_qs(callback.query) == {"conversation": ["7"], "from": [CALLER]}
    bye = twiml(phone.answer(HangUp("Sorry.")).body)
    assert bye.findtext("Say") == "Sorry." and bye.find("Hangup") is not None
    assert twiml(phone.answer(HangUp()).body).findtext("Say") == "Thank you. Goodbye."
    assert twiml(phone.answer(StandBy()).body).find("Pause") is not None
    assert len(twiml(phone.answer(Acknowledge()).body)) == 0
