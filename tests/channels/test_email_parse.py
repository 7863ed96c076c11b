"""channels.email_parse against the fixture corpus (tests/channels/fixtures/email/README.md).

One test per .eml file checks every manifest key that applies; a hypothesis test mutates
the fixtures (truncation, byte flips, CR/LF insertion) and requires that parse_email only
ever returns a ParsedEmail or raises Unparseable.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels.email_parse import THREAD_TOKEN, ParsedEmail, Unparseable, parse_email

FIXTURES = Path(__file__).parent / "fixtures" / "email"
MANIFEST: dict[str, dict[str, Any]] = json.loads(
    (FIXTURES / "manifest.json").read_text(encoding="utf-8")
)
FILES = sorted(path.name for path in FIXTURES.glob("*.eml"))
PARSEABLE = [n for n in FILES if MANIFEST.get(n, {}).get("classification") != "quarantine"]
TRUSTED = ("mx.support.example.com",)
UNSAFE_FILENAME = re.compile(r"[/\\\x00-\x1f\x7f]")


@cache
def raw_of(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@cache
def parsed(name: str) -> ParsedEmail:
    return parse_email(raw_of(name), trusted_authserv_ids=TRUSTED)


def norm(text: str) -> str:
    """The manifest compares text with white-space runs collapsed."""
    return re.sub(r"\s+", " ", text).strip()


def test_corpus_is_complete() -> None:
    assert len(FILES) >= 40
    assert set(FILES) == set(MANIFEST)


@pytest.mark.parametrize("name", FILES)
def test_fixture(name: str) -> None:
    exp = MANIFEST[name]
    raw = raw_of(name)
    if exp["classification"] == "quarantine":
        with pytest.raises(Unparseable) as caught:
            parse_email(raw, trusted_authserv_ids=TRUSTED)
        assert caught.value.reason.strip()
        assert str(caught.value) == caught.value.reason
        return

    p = parsed(name)
    assert p.classification == exp["classification"]
    assert p.no_auto_reply is exp["no_auto_reply"]
    assert p.sender == exp["from"]
    if "from_name" in exp:
        assert p.sender_name == exp["from_name"]
    assert p.subject == exp["subject"]

    text = norm(p.text)
    for needle in exp.get("text_contains", []):
        assert norm(needle) in text, needle
    for needle in exp.get("text_not_contains", []):
        assert norm(needle) not in text, needle

    if "attachments" in exp:
        assert len(p.attachments) == len(exp["attachments"])
        for got, want in zip(p.attachments, exp["attachments"], strict=True):
            if want["filename"] is None:  # none given: a synthesised, safe one
                assert got.filename.startswith("attachment-"), got.filename
            else:
                assert got.filename == want["filename"]
            assert got.content_type == want["content_type"]
            assert len(got.data) == want["size"]
            assert got.inline is want.get("inline", False)
            if "content_id" in want:
                assert got.content_id == want["content_id"]

    if "in_reply_to" in exp:
        assert p.in_reply_to == exp["in_reply_to"]
    assert p.references == tuple(exp.get("references", ()))
    assert p.thread_token == exp.get("thread_token")
    assert p.auth == exp.get("auth")

    if "bounce_of" in exp:
        assert p.bounce_of == exp["bounce_of"]
    elif exp["classification"] == "message":
        assert p.bounce_of is None
    if "dsn" in exp:
        assert p.dsn == exp["dsn"]
    elif exp["classification"] != "bounce":
        assert p.dsn is None
    for needle in exp.get("bounce_reason_contains", []):
        assert needle in (p.bounce_reason or ""), p.bounce_reason
    if exp["classification"] == "bounce" and p.bounce_of is not None:
        assert p.bounce_refs[0] == p.bounce_of


@pytest.mark.parametrize("name", PARSEABLE)
def test_invariants(name: str) -> None:
    """What every parsed message guarantees, whatever the fixture is about."""
    raw = raw_of(name)
    p = parsed(name)
    assert p.size == len(raw)
    assert p.sha256 == hashlib.sha256(raw).hexdigest()
    assert "\x00" not in p.text and "\x00" not in p.full_text
    # quote stripping only removes lines (">>> DATA" of an SMTP transcript too): it never
    # invents one
    full = norm(p.full_text)
    assert all(norm(line) in full for line in p.text.split("\n"))
    for name_ in (p.sender_name or "", p.subject or ""):
        assert "\r" not in name_ and "\n" not in name_
    for attachment in p.attachments:
        assert attachment.filename and not UNSAFE_FILENAME.search(attachment.filename)
        assert attachment.filename not in (".", "..")
    if p.date is not None:
        assert p.date.tzinfo is not None
    if p.thread_token is not None:
        assert THREAD_TOKEN.fullmatch(p.thread_token)


@pytest.mark.parametrize(
    "name",
    [
        "reply_gmail_quoted.eml",
        "reply_outlook_original_message.eml",
        "reply_outlook_german_html.eml",
        "reply_apple_mail.eml",
    ],
)
def test_quote_stripping_keeps_history_in_full_text(name: str) -> None:
    p = parsed(name)
    hidden = [n for n in MANIFEST[name]["text_not_contains"] if "QUOTED" in n or "ORIGINAL" in n]
    assert hidden
    for needle in hidden:
        assert needle not in p.text
        assert needle in p.full_text


def test_hostile_html_is_sanitized() -> None:
    p = parsed("hostile_html.eml")
    assert p.html is not None
    lowered = p.html.lower()
    for needle in ("<script", "onerror", "onload", "javascript:", "<iframe", "<form", "<svg"):
        assert needle not in lowered, needle
    assert "Please check my account." in p.html


def test_html_only_is_sanitized_and_loads_no_remote_image() -> None:
    p = parsed("html_only.eml")
    assert p.html is not None
    assert "<script" not in p.html and "track.example.net" not in p.html
    assert "<table>" in p.html  # structure survives


def test_multipart_alternative_keeps_sanitized_html() -> None:
    p = parsed("multipart_alternative.eml")
    assert p.html is not None and "HTML-ONLY-VERSION" in p.html


def test_threading_and_dates() -> None:
    p = parsed("plain_ascii.eml")
    assert p.message_id == "<plain-ascii-0001@example.com>"
    assert p.date is not None and p.date.tzinfo is not None
    assert parsed("raises_message_id_empty.eml").message_id is None
    assert parsed("no_message_id.eml").message_id is None
    for name in ("missing_date.eml", "invalid_date.eml", "raises_date_overflow.eml"):
        assert parsed(name).date is None, name


def test_injected_crlf_is_removed_from_the_display_name() -> None:
    p = parsed("raises_from_encoded_crlf.eml")
    assert p.sender == "quinn@example.com"
    assert p.sender_name is not None and p.sender_name.startswith("Support Team")


def test_deep_caller_stack_does_not_change_the_outcome() -> None:
    """Parsing runs on its own thread: a caller already deep in recursion gets the same
    answer (the 300-level file parses, the 1200-level one is quarantined)."""
    margin = 40

    def descend(remaining: int, name: str) -> ParsedEmail:
        if remaining > 0:
            return descend(remaining - 1, name)
        return parse_email(raw_of(name))

    depth = sys.getrecursionlimit() - len(inspect.stack(0)) - margin
    assert "Deepest part reached after 300 levels." in descend(depth, "nested_300_levels.eml").text
    with pytest.raises(Unparseable):
        descend(depth, "nested_1200_levels.eml")


def test_wrong_input_type_is_unparseable() -> None:
    with pytest.raises(Unparseable):
        parse_email("From: a@example.com\r\n\r\nhi")  # type: ignore[arg-type]
    with pytest.raises(Unparseable):
        parse_email(b"")
    with pytest.raises(Unparseable):
        parse_email(b"\x00\xff garbage without any header")


@pytest.mark.parametrize(
    ("header", "address", "name"),
    [
        # a display name that looks like an address never wins over the angle-addr
        ("support@example.com <x@customer.example>", "x@customer.example", "support@example.com"),
        ('"support@example.com" <x@customer.example>', "x@customer.example", "support@example.com"),
        (
            "=?utf-8?q?support=40example=2Ecom?= <x@customer.example>",
            "x@customer.example",
            "support@example.com",
        ),
        (
            '"Eve <support@example.com>" <eve@customer.example>',
            "eve@customer.example",
            "Eve <support@example.com>",
        ),
        (
            "Support <support@example.com> <x@customer.example>",
            "x@customer.example",
            "Support <support@example.com>",
        ),
        # quoted names with commas, escapes, partly quoted names, unquoted commas
        ('"Doe, John" <j@customer.example>', "j@customer.example", "Doe, John"),
        ("Doe, John <j@customer.example>", "j@customer.example", "Doe, John"),
        ('"Ann \\"Q\\" Lee" <a@customer.example>', "a@customer.example", 'Ann "Q" Lee'),
        ('Joe "the boss" Smith <j@customer.example>', "j@customer.example", "Joe the boss Smith"),
        (
            "=?iso-8859-1?q?J=FCrgen_M=FCller?= <j@customer.example>",
            "j@customer.example",
            "J\u00fcrgen M\u00fcller",
        ),
        ("Jo (support@example.com) <jo@customer.example>", "jo@customer.example", "Jo"),
        # groups and lists: the first mailbox
        ("Team: a@customer.example, b@customer.example;", "a@customer.example", None),
        ("a@customer.example, Other <b@customer.example>", "a@customer.example", None),
        ("<@relay.example:r@customer.example>", "r@customer.example", None),
        # missing angle brackets: the address follows the name
        ("John j@customer.example", "j@customer.example", None),
        ("support@example.com x@customer.example", "x@customer.example", None),
        ("x@customer.example (support@example.com)", "x@customer.example", "support@example.com"),
        ("X@Customer.Example", "x@customer.example", None),
    ],
)
def test_the_address_in_angle_brackets_is_the_sender(
    header: str, address: str, name: str | None
) -> None:
    raw = f"From: {header}\r\nTo: support@example.com\r\nSubject: s\r\n\r\nhi\r\n"
    p = parse_email(raw.encode("utf-8"))
    assert (p.sender, p.sender_name) == (address, name)


def test_an_empty_group_in_from_falls_back_to_the_sender_header() -> None:
    raw = (
        b"From: undisclosed-recipients:;\r\nSender: Real <real@customer.example>\r\n"
        b"To: support@example.com\r\nSubject: s\r\n\r\nhi\r\n"
    )
    assert parse_email(raw).sender == "real@customer.example"


# -- fuzzing ----------------------------------------------------------------------------------
# The 4 MB attachment file would make every example slow without adding structure.
FUZZ_FILES = [name for name in FILES if len(raw_of(name)) <= 128 * 1024]
LINE_BREAKS = (b"\r\n", b"\r", b"\n")


@st.composite
def mutated_fixture(draw: st.DrawFn) -> bytes:
    raw = bytearray(raw_of(draw(st.sampled_from(FUZZ_FILES))))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        if not raw:
            break
        operation = draw(st.sampled_from(("truncate", "flip", "line_break")))
        position = draw(st.integers(min_value=0, max_value=len(raw) - 1))
        if operation == "truncate":
            del raw[position:]
        elif operation == "flip":
            raw[position] ^= draw(st.integers(min_value=1, max_value=255))
        else:
            raw[position:position] = draw(st.sampled_from(LINE_BREAKS))
    return bytes(raw)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(raw=mutated_fixture())
def test_mutated_fixtures_never_crash(raw: bytes) -> None:
    try:
        result = parse_email(raw, trusted_authserv_ids=TRUSTED)
    except Unparseable as exc:
        assert exc.reason.strip()
        return
    assert isinstance(result, ParsedEmail)
    assert result.size == len(raw)
    assert "\x00" not in result.text
    assert result.classification in ("message", "bounce", "auto_reply", "bulk")
    assert result.no_auto_reply is (result.classification != "message")
