"""How a web-chat visitor proves who they are (docs/identity.md): a site-signed customer id
in the ``hello``, or an email address or phone number proven with a one-time code. A proof
links the visitor's contact to that identity (merging with its verified owner); the visitor
still sees only their own chat, never the linked history."""

from __future__ import annotations

import logging
import re
from typing import Any

from channels.base import OutboundMessage, PermanentSendError, Sender, TemporarySendError
from channels.phone import normalize_e164
from channels.webchat import WebChatChannel
from router.db import Tx
from router.exceptions import Conflict, OmnirouteError
from router.identity import CODE_TTL, check_code, link_verified, new_code, signed_identity_ok
from router.pipeline import resolve_contact
from router.runtime import Runtime

__all__ = ["finish_proof", "sign_in", "start_proof"]

log = logging.getLogger(__name__)
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,253}\.[^@\s.]{2,63}$")
# outbound ids of code messages, apart from every message id (the email Message-ID)
_CODE_MESSAGE_BASE = 10**15


def _visitor(tx: Tx, address: str, name: str | None) -> tuple[int, int]:
    """``(identity_id, contact_id)`` of the visitor, created before their first message."""
    contact_id, identity_id, _ = resolve_contact(
        tx, Sender("webchat", address, True, (name or "").strip()[:100] or None, "visitor_token")
    )
    return identity_id, contact_id


def _prove(tx: Tx, address: str, name: str | None, kind: str, proven: str, how: str) -> int:
    _, contact_id = _visitor(tx, address, name)
    return link_verified(tx, contact_id, kind, proven, how, actor="visitor")


async def sign_in(
    runtime: Runtime, channel: WebChatChannel, address: str, name: str | None, claim: object
) -> str | None:
    """The site's signed customer id from the ``hello``: linked when the signature is right;
    otherwise why not (and nothing is linked)."""
    secret = channel.web_config.identity_secret
    if secret is None:
        return "this chat takes no signed identity"
    if not isinstance(claim, dict) or not signed_identity_ok(
        secret.get_secret_value(), claim.get("id"), claim.get("signature")
    ):
        log.info("web chat %s: a signed identity with a wrong signature refused", channel.slug)
        return "the identity's signature is not valid"
    namespace = channel.web_config.identity_namespace or channel.slug
    await runtime.db.write(
        _prove, address, name, "external", f"{namespace}:{claim['id']}", "signed_identity"
    )
    return None


def _normalize(kind: object, value: object) -> tuple[str, str]:
    if not isinstance(value, str) or len(value) > 320:
        raise ValueError("address must be a string")
    if kind == "email":
        email = value.strip().lower()
        if not _EMAIL.match(email):
            raise ValueError("that is not an email address")
        return "email", email
    if kind == "phone":
        return "phone", normalize_e164(value)
    raise ValueError('kind must be "email" or "phone"')


async def start_proof(
    runtime: Runtime, channel: WebChatChannel, address: str, name: str | None, frame: dict[str, Any]
) -> dict[str, Any]:
    """``verify_start``: send a one-time code to the claimed address (by email or SMS)."""
    try:
        kind, claimed = _normalize(frame.get("kind"), frame.get("address"))
    except ValueError as exc:
        return {"type": "error", "code": "invalid", "message": str(exc)}
    config = channel.web_config
    slug = config.verify_email_inbox if kind == "email" else config.verify_sms_inbox
    sender = runtime.channels.get(slug) if slug else None
    if sender is None or not runtime.inboxes[slug].enabled:  # type: ignore[index]
        return {
            "type": "error",
            "code": "unavailable",
            "message": f"this chat cannot send codes by {'email' if kind == 'email' else 'SMS'}",
        }
    secret = runtime.channel_secret

    def issue(tx: Tx) -> tuple[int, str]:
        identity_id, _ = _visitor(tx, address, name)
        return new_code(tx, identity_id, kind, claimed, secret)

    try:
        code_id, code = await runtime.db.write(issue)
    except Conflict as exc:
        return {"type": "error", "code": "rate_limited", "message": exc.message}
    minutes = int(CODE_TTL.total_seconds() // 60)
    message = OutboundMessage(
        message_id=_CODE_MESSAGE_BASE + code_id,
        conversation_id=0,
        recipient=Sender(kind, claimed, True),
        text=f"Your verification code is {code}. It expires in {minutes} minutes. "
        "If you did not ask for it, ignore this message.",
        subject="Your verification code",
        is_auto=True,
        data={"verification": True},
    )
    try:
        await sender.send(message)
    except (TemporarySendError, PermanentSendError) as exc:
        log.warning("web chat %s: a code to a %s could not be sent: %s", channel.slug, kind, exc)
        return {"type": "error", "code": "send_failed", "message": "the code could not be sent"}
    return {"type": "verify_sent", "kind": kind, "address": claimed, "expires_in": minutes * 60}


async def finish_proof(
    runtime: Runtime, address: str, name: str | None, frame: dict[str, Any]
) -> dict[str, Any]:
    """``verify_code``: the code that arrived proves the address; the visitor's contact is
    linked to it. A wrong code is counted (a few attempts per code)."""
    secret = runtime.channel_secret

    def attempt(tx: Tx) -> tuple[str, str] | str:
        identity_id, _ = _visitor(tx, address, name)
        return check_code(tx, identity_id, frame.get("code"), secret)

    try:
        result = await runtime.db.write(attempt)
        if isinstance(result, str):
            return {"type": "error", "code": "wrong_code", "message": result}
        kind, proven = result
        await runtime.db.write(_prove, address, name, kind, proven, f"code:{kind}")
    except OmnirouteError as exc:
        return {"type": "error", "code": exc.code, "message": exc.message}
    return {"type": "verified", "kind": kind, "address": proven}
