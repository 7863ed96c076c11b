"""The provider inboxes the benchmarks configure against local fakes (tests/fakes), and how
their webhooks are signed, shared by bench/b1.py and bench/crash.py."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

__all__ = [
    "ACCOUNT",
    "APP_SECRET",
    "OUR_NUMBER",
    "PAGE_ID",
    "PAGE_TOKEN",
    "TOKEN",
    "messenger_inbox",
    "meta_apps",
    "meta_signature",
    "twilio_inbox",
]

ACCOUNT = "AC" + "0123456789abcdef" * 2  # tests.fakes.twilio's defaults
TOKEN = "feedface" * 4
OUR_NUMBER = "+15550000000"
APP_SECRET = "bench-app-secret-0123456789"
PAGE_ID = "106000000000001"
PAGE_TOKEN = "EAAG-bench-token"


def twilio_inbox(api_base_url: str) -> dict[str, Any]:
    """An SMS inbox on Twilio whose REST calls go to a FakeTwilioServer."""
    return {
        "channel": "sms",
        "provider": "twilio",
        "account_sid": ACCOUNT,
        "auth_token": TOKEN,
        "from_number": OUR_NUMBER,
        "api_base_url": api_base_url,
    }


def messenger_inbox(api_base_url: str, **extra: Any) -> dict[str, Any]:
    """A Messenger inbox of the ``main`` app whose Graph calls go to a FakeGraphServer
    (started with ``access_token=PAGE_TOKEN``)."""
    return {
        "channel": "messenger",
        "provider": "meta",
        "app": "main",
        "page_id": PAGE_ID,
        "access_token": PAGE_TOKEN,
        "api_base_url": api_base_url,
        **extra,
    }


def meta_apps() -> dict[str, Any]:
    return {"main": {"app_secret": APP_SECRET, "verify_token": "bench-verify"}}


def meta_signature(body: bytes) -> str:
    """``X-Hub-Signature-256`` of a webhook body, as Meta signs it."""
    return "sha256=" + hmac.new(APP_SECRET.encode(), body, hashlib.sha256).hexdigest()
