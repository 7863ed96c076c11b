"""Every header we write is built from text checked after full decoding.

An encoded word (RFC 2047) may decode to another encoded word; the email package decodes
values set on a message, so a subject decoded only once used to carry CR/LF into our
replies (an attacker's Reply-To, Content-Type and body). The property test nests B and Q
encodings of text with control characters and non-ASCII several levels deep, puts it in
every header whose value we take from outside (subject, display name, attachment name,
In-Reply-To/References) and checks that the serialized message parses back to exactly the
headers we meant, with the body intact and no control character on any header line.
"""

from __future__ import annotations

import base64
import email
import email.policy
import re
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.email_parse import decode_header_text, parse_email
from channels.email_smtp import OutgoingAttachment, build_message, header_text

DATE = datetime(2024, 3, 4, 10, 0, tzinfo=UTC)
BODY = "Hello,\nthe body stays the body.\n"
PARENT = "<parent-1@mail.example.net>"
ATTACK_INNER = "=?utf-8?q?x=0D=0AReply-To:_evil@x=0D=0AContent-Type:_text/html?="
ATTACK = "=?utf-8?b?" + base64.b64encode(ATTACK_INNER.encode()).decode() + "?="
# Characters that end a header line for some parser (str.splitlines too) or have no place in
# one, as the test sees them on the wire.
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")

ATOMS = st.sampled_from(
    [
        "Order",
        " ",
        "1234",
        "é",
        "日本語",
        "🙂",
        "\r\n",
        "\r",
        "\n",
        "\x00",
        "\x0b",
        "\x0c",
        "\x1c",
        "\x85",
        "\u2028",
        "\t",
        ":",
        "=?",
        "?=",
        "?",
        "=",
        "_",
        '"',
        "<",
        ">",
        "@",
        "Reply-To: evil@example.org",
        "Content-Type: text/html",
        "Bcc: evil@example.org",
        "\r\n\r\n<b>not the body</b>",
    ]
)


def _q(data: bytes) -> str:
    out = []
    for byte in data:
        ch = chr(byte)
        if ch.isascii() and ch.isalnum():
            out.append(ch)
        elif ch == " ":
            out.append("_")
        else:
            out.append(f"={byte:02X}")
    return "".join(out)


@st.composite
def nested(draw: st.DrawFn) -> str:
    """Text wrapped in up to five levels of encoded words, with text around some levels."""
    text = "".join(draw(st.lists(ATOMS, min_size=1, max_size=8)))
    for _ in range(draw(st.integers(0, 5))):
        charset = draw(st.sampled_from(["utf-8", "UTF-8", "iso-8859-1"]))
        try:
            data = text.encode(charset)
        except UnicodeEncodeError:
            charset, data = "utf-8", text.encode()
        if draw(st.booleans()):
            word = f"=?{charset}?b?{base64.b64encode(data).decode()}?="
        else:
            word = f"=?{charset}?q?{_q(data)}?="
        before = draw(st.sampled_from(["", "Re: ", "x ", "\r\n "]))
        after = draw(st.sampled_from(["", " [#1-deadbeef]", " y"]))
        text = before + word + after
    return text


def build(value: str, *, references: list[str] | None = None) -> EmailMessage:
    return build_message(
        from_address="support@example.com",
        from_name=value,
        to="customer@example.net",
        subject=f"Re: {value}",
        text=BODY,
        html=None,
        attachments=[OutgoingAttachment(f"{value}.txt", "text/plain", b"data")],
        message_id="<or-1.abcdef12@example.com>",
        in_reply_to=PARENT,
        references=references if references is not None else [PARENT],
        auto=True,
        date=DATE,
    )


EXPECTED_TOP = [
    "from",
    "to",
    "subject",
    "date",
    "message-id",
    "in-reply-to",
    "references",
    "auto-submitted",
    "x-auto-response-suppress",
    "mime-version",
    "content-type",
]


def squeeze(text: str) -> str:
    return "".join(text.split())


def check_wire(raw: bytes, value: str) -> None:
    """The serialized message says exactly what we meant to write."""
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep, "no header/body separator"
    for line in head.split(b"\r\n"):
        text = line.decode("ascii")  # policy SMTP: headers are ASCII, non-ASCII is encoded
        assert not CONTROL.search(text.replace("\t", " ")), line
        assert re.match(r"[A-Za-z-]+:( |$)|[ \t]", text), f"not a header line: {line!r}"

    expected = header_text(value)
    assert not CONTROL.search(expected) and "=?" not in expected
    assert decode_header_text(expected) == expected  # nothing left to decode

    sent = email.message_from_bytes(raw, policy=email.policy.default)
    assert sorted(k.lower() for k in sent) == sorted(EXPECTED_TOP)
    # (a subject folded right after "Subject:" keeps the fold's space: strip it)
    assert str(sent["Subject"]).strip() == header_text(f"Re: {value}")
    (sender,) = sent["From"].addresses
    assert sender.addr_spec == "support@example.com"
    # The email package folds a display name mixing ASCII and non-ASCII into several encoded
    # words and loses or adds a space where it splits them (RFC 2047 drops the whitespace
    # between encoded words): the words must be ours, the spacing is its business.
    assert squeeze(sender.display_name) == squeeze(expected)
    assert [a.addr_spec for a in sent["To"].addresses] == ["customer@example.net"]
    assert str(sent["In-Reply-To"]) == PARENT
    assert sent.get_content_type() == "multipart/mixed"
    body, attachment = list(sent.iter_parts())
    assert body.get_content_type() == "text/plain"
    assert body.get_content().replace("\r\n", "\n") == BODY
    assert sorted(k.lower() for k in body) == ["content-transfer-encoding", "content-type"]
    assert sorted(k.lower() for k in attachment) == [
        "content-disposition",
        "content-transfer-encoding",
        "content-type",
    ]
    filename = attachment.get_filename()
    assert filename is not None and not CONTROL.search(filename) and "=?" not in filename
    assert attachment.get_payload(decode=True) == b"data"

    # ... and our own parser (what a reply to this message goes through) agrees
    parsed = parse_email(raw)
    assert (parsed.subject or "").strip() == header_text(f"Re: {value}")
    assert parsed.sender == "support@example.com"
    assert squeeze(parsed.sender_name or "") == squeeze(expected)
    assert parsed.in_reply_to == PARENT


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nested())
def test_every_header_we_write_parses_back_as_meant(value: str) -> None:
    msg = build(value, references=[PARENT, f"<{value}@mail.example.net>"])
    check_wire(msg.as_bytes(), value)


@settings(max_examples=200, deadline=None)
@given(nested())
def test_header_text_is_the_fully_decoded_text(value: str) -> None:
    """Decoding a nested value gives what decoding its innermost text gives."""
    inner = value
    while True:  # peel the levels our strategy added, exactly
        peeled = decode_header_text(inner)
        if peeled == inner:
            break
        inner = peeled
    assert header_text(value) == header_text(inner)
    assert header_text(header_text(value)) == header_text(value)


def test_the_reported_subject_cannot_add_headers() -> None:
    msg = build(ATTACK)
    raw = msg.as_bytes()
    check_wire(raw, ATTACK)
    sent = email.message_from_bytes(raw, policy=email.policy.default)
    assert "Reply-To" not in sent
    assert str(sent["Subject"]) == "Re: x Reply-To: evil@x Content-Type: text/html"


@pytest.mark.parametrize(
    "ident",
    [
        "<a=?utf-8?q?x=0D=0ABcc:_evil?=@b>",
        "<=?utf-8?b?" + base64.b64encode(b"\r\nBcc: e@x").decode() + "?=@x>",
    ],
)
def test_msg_ids_are_written_literally_or_dropped(ident: str) -> None:
    msg = build("Order", references=[ident, PARENT])
    raw = msg.as_bytes()
    check_wire(raw, "Order")
    assert b"Bcc" not in raw
    assert str(email.message_from_bytes(raw, policy=email.policy.default)["References"]) == PARENT


def test_an_address_that_is_an_encoded_word_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid email address"):
        build_message(
            from_address="support@example.com",
            from_name=None,
            to="a=?utf-8?q?x=0D=0ABcc:_evil?=@example.net",
            subject="s",
            text=BODY,
            html=None,
            attachments=[],
            message_id="<or-1.abcdef12@example.com>",
            in_reply_to=None,
            references=[],
            auto=False,
            date=DATE,
        )


def test_inbound_subjects_are_fully_decoded() -> None:
    raw = (
        f"From: c@example.net\r\nTo: support@example.com\r\nSubject: {ATTACK}\r\n"
        "Message-ID: <m1@example.net>\r\n\r\nhello\r\n"
    ).encode()
    parsed = parse_email(raw)
    assert parsed.subject is not None and "=?" not in parsed.subject
    assert "\r" not in parsed.subject and "\n" not in parsed.subject
    assert parsed.subject.startswith("x") and "Reply-To: evil@x" in parsed.subject
