"""Phone numbers as identities: E.164, one number one customer across SMS, voice and
WhatsApp (docs/identity.md)."""

from __future__ import annotations

import re

import phonenumbers

__all__ = ["normalize_e164"]

_PHONE_CHARS = re.compile(r"^\+[0-9 ().\-/]{2,30}$")
# addresses of other kinds that carry a number (Twilio's channel addresses, SIP)
_NOT_SMS_PREFIXES = ("whatsapp:", "messenger:", "client:", "sip:", "rcs:")


def normalize_e164(value: str) -> str:
    """``value`` as an E.164 number (``+14155550100``); ValueError when it is not a phone number.

    Twilio sends E.164 already; this also accepts the usual punctuation (``+1 (415) 555-0100``)
    but never a number without its ``+country`` prefix (there is no region to guess from).
    """
    text = value.strip()
    if text.lower().startswith(_NOT_SMS_PREFIXES):
        raise ValueError("not an SMS address (channel prefix)")
    if not _PHONE_CHARS.match(text):
        raise ValueError("not a phone number in international format (+country...)")
    try:
        number = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"not a phone number: {exc}") from exc
    # is_possible (length per country), not is_valid: validity metadata lags behind newly
    # allocated ranges, and refusing a real customer is worse than accepting an odd number.
    if not phonenumbers.is_possible_number(number):
        raise ValueError("not a possible phone number for its country code")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
