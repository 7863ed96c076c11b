"""One customer across channels (docs/identity.md).

Contacts are linked automatically only through verified identities (a channel's proof, a
one-time code, a signed site identity); anything else is a hint. Agents and admins merge
contacts by hand and can split an identity back out; every such change is a
``ContactLink`` row (what moved, the conflicts and who did it) and a ConversationEvent on
each conversation it touched. A contact can be exported and erased for data-protection
requests.

Merge rule for conflicting fields: the surviving contact's value wins where both have one;
the merged contact's value fills what the survivor lacks; ``vip`` is kept if either had it;
custom attributes merge the same way, key by key. Every dropped value is recorded in the
link's ``detail.conflicts``.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, Connection, delete, func, insert, or_, select, true, update

from router.db import Tx
from router.events import add_event
from router.exceptions import Conflict, Forbidden, InvalidInput, NotFound
from router.models import (
    Contact,
    ContactHint,
    ContactIdentity,
    ContactLink,
    Conversation,
    ConversationEvent,
    Message,
    Outbox,
    VerificationCode,
)
from router.serialize import iso
from router.types import Actor, EventKind, OutboxState

__all__ = [
    "CODE_ATTEMPTS",
    "CODE_TTL",
    "SAME_NUMBER",
    "check_code",
    "contact_links",
    "erase_contact",
    "export_contact",
    "identity_payload",
    "join_same_number",
    "link_same_number",
    "link_verified",
    "merge_as",
    "merge_contacts",
    "new_code",
    "signed_identity_ok",
    "split_identity",
    "suggestions",
]

CODE_TTL = timedelta(minutes=10)
CODE_ATTEMPTS = 5  # wrong codes before the code is spent
CODES_PER_VISITOR = 3  # codes a visitor may ask for per CODES_WINDOW
CODES_PER_ADDRESS = 5  # codes one address may receive per CODES_WINDOW (no mail bombing)
CODES_WINDOW = timedelta(hours=1)
_FIELDS = ("name", "email", "phone", "language", "tier")
_CUSTOMER_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


def _actor(actor: str) -> Actor:
    return (
        Actor.CUSTOMER if actor == "visitor" else Actor.SYSTEM if actor == "system" else Actor.ADMIN
    )


def _live_contact(tx: Tx | Connection, contact_id: int) -> Any:
    row = tx.execute(select(Contact).where(Contact.id == contact_id)).first()
    if row is None:
        raise NotFound(f"no contact {contact_id}")
    if row.merged_into_id is not None:
        raise Conflict(
            f"contact {contact_id} was merged into contact {row.merged_into_id}",
            merged_into=row.merged_into_id,
        )
    if row.erased_at is not None:
        raise Conflict(f"contact {contact_id} was erased")
    return row


def _lock(tx: Tx, *contact_ids: int) -> None:
    """Lock contacts in id order (no deadlock between two merges): an ingest that read an
    identity before the merge waits, then follows ``merged_into_id`` (pipeline)."""
    if tx.dialect == "postgresql":
        tx.execute(
            select(Contact.id)
            .where(Contact.id.in_(sorted(set(contact_ids))))
            .order_by(Contact.id)
            .with_for_update()
        ).all()


def _link(tx: Tx, action: str, contact_id: int, actor: str, **values: Any) -> int:
    return int(
        tx.execute(
            insert(ContactLink)
            .values(
                action=action,
                contact_id=contact_id,
                actor=actor,
                created_at=tx.now,
                detail=values.pop("detail", {}),
                **values,
            )
            .returning(ContactLink.id)
        ).scalar_one()
    )


# -- merge and split ----------------------------------------------------------------------
def merge_contacts(
    tx: Tx, source_id: int, target_id: int, *, actor: str, reason: str | None = None
) -> dict[str, Any]:
    """Move everything of ``source`` onto ``target`` (identities, conversations and their
    messages, hints, attributes); ``source`` stays as a pointer (``merged_into_id``)."""
    if source_id == target_id:
        raise InvalidInput("a contact cannot be merged into itself")
    _lock(tx, source_id, target_id)
    source, target = _live_contact(tx, source_id), _live_contact(tx, target_id)
    identities = list(
        tx.execute(
            select(ContactIdentity.id).where(ContactIdentity.contact_id == source_id)
        ).scalars()
    )
    conversations = list(
        tx.execute(select(Conversation.id).where(Conversation.contact_id == source_id)).scalars()
    )
    values: dict[str, Any] = {}
    conflicts: dict[str, Any] = {}
    for name in _FIELDS:
        kept, other = getattr(target, name), getattr(source, name)
        if kept is None and other is not None:
            values[name] = other
        elif other is not None and other != kept:
            conflicts[name] = {"kept": kept, "dropped": other}
    attributes = dict(target.attributes or {})
    for key, value in (source.attributes or {}).items():
        if key not in attributes or attributes[key] is None:
            attributes[key] = value
        elif attributes[key] != value:
            conflicts[f"attributes.{key}"] = {"kept": attributes[key], "dropped": value}
    values.update(attributes=attributes, vip=bool(target.vip or source.vip), updated_at=tx.now)
    tx.execute(
        update(ContactIdentity)
        .where(ContactIdentity.contact_id == source_id)
        .values(contact_id=target_id)
    )
    tx.execute(
        update(Conversation)
        .where(Conversation.contact_id == source_id)
        .values(contact_id=target_id)
    )
    tx.execute(
        update(ContactHint).where(ContactHint.contact_id == source_id).values(contact_id=target_id)
    )
    tx.execute(update(Contact).where(Contact.id == target_id).values(**values))
    tx.execute(
        update(Contact)
        .where(Contact.id == source_id)
        .values(merged_into_id=target_id, updated_at=tx.now)
    )
    link_id = _link(
        tx,
        "merge",
        target_id,
        actor,
        other_contact_id=source_id,
        reason=reason,
        detail={
            "identities": identities,
            "conversations": conversations,
            "conflicts": conflicts,
            "source": {name: getattr(source, name) for name in _FIELDS},
        },
    )
    for conversation_id in conversations:
        add_event(
            tx,
            conversation_id,
            EventKind.MERGED,
            _actor(actor),
            by=actor,
            from_contact=source_id,
            into_contact=target_id,
            link=link_id,
        )
    return {
        "contact_id": target_id,
        "merged_contact_id": source_id,
        "link_id": link_id,
        "identities": identities,
        "conversations": conversations,
        "conflicts": conflicts,
    }


def split_identity(
    tx: Tx, identity_id: int, *, actor: str, reason: str | None = None
) -> dict[str, Any]:
    """Undo a link: the identity moves to a contact of its own, with the conversations that
    it started (whose first customer message came from it)."""
    identity = tx.execute(select(ContactIdentity).where(ContactIdentity.id == identity_id)).first()
    if identity is None:
        raise NotFound(f"no identity {identity_id}")
    contact_id = int(identity.contact_id)
    _lock(tx, contact_id)
    contact = _live_contact(tx, contact_id)
    others = tx.execute(
        select(func.count())
        .select_from(ContactIdentity)
        .where(ContactIdentity.contact_id == contact_id, ContactIdentity.id != identity_id)
    ).scalar_one()
    if not others:
        raise InvalidInput("this is the contact's only identity: there is nothing to split it from")
    first_in = (
        select(Message.conversation_id, func.min(Message.id).label("first_id"))
        .where(Message.direction == "in", Message.identity_id.is_not(None))
        .group_by(Message.conversation_id)
        .subquery()
    )
    conversations = list(
        tx.execute(
            select(Conversation.id)
            .join(first_in, first_in.c.conversation_id == Conversation.id)
            .join(Message, Message.id == first_in.c.first_id)
            .where(Conversation.contact_id == contact_id, Message.identity_id == identity_id)
            .order_by(Conversation.id)
        ).scalars()
    )
    # the merge that brought this identity, if any: its contact's fields come back with it
    merged = tx.execute(
        select(ContactLink.detail)
        .where(ContactLink.contact_id == contact_id, ContactLink.action == "merge")
        .order_by(ContactLink.id.desc())
    ).scalars()
    restored = next(
        (d.get("source") or {} for d in merged if identity_id in (d.get("identities") or [])), {}
    )
    new_id = int(
        tx.execute(
            insert(Contact)
            .values(
                name=restored.get("name"),
                language=restored.get("language"),
                tier=restored.get("tier"),
                email=identity.address if identity.verified and identity.kind == "email" else None,
                phone=identity.address if identity.verified and identity.kind == "phone" else None,
                vip=False,
                attributes={},
                created_at=tx.now,
                updated_at=tx.now,
            )
            .returning(Contact.id)
        ).scalar_one()
    )
    tx.execute(
        update(ContactIdentity).where(ContactIdentity.id == identity_id).values(contact_id=new_id)
    )
    if conversations:
        tx.execute(
            update(Conversation)
            .where(Conversation.id.in_(conversations))
            .values(contact_id=new_id, updated_at=tx.now)
        )
    clear = {f: None for f in ("email", "phone") if getattr(contact, f) == identity.address}
    if clear:
        tx.execute(update(Contact).where(Contact.id == contact_id).values(**clear))
    link_id = _link(
        tx,
        "split",
        contact_id,
        actor,
        other_contact_id=new_id,
        identity_id=identity_id,
        reason=reason,
        detail={"conversations": conversations},
    )
    for conversation_id in conversations:
        add_event(
            tx,
            conversation_id,
            EventKind.SPLIT,
            _actor(actor),
            by=actor,
            from_contact=contact_id,
            into_contact=new_id,
            identity=identity_id,
            link=link_id,
        )
    return {
        "contact_id": new_id,
        "split_from": contact_id,
        "identity_id": identity_id,
        "conversations": conversations,
        "link_id": link_id,
    }


def merge_as(
    tx: Tx,
    target_id: int,
    source_id: int,
    *,
    actor: str,
    any_pair: bool,
    reason: str | None = None,
) -> dict[str, Any]:
    """A person's merge: supervisors and admins (``any_pair``) merge any two contacts; an
    agent only a match suggested for one of them."""
    if not any_pair:
        suggested = {s["contact_id"] for s in suggestions(tx.conn, target_id, limit=50)}
        if source_id not in suggested:
            raise Forbidden(
                "agents may merge only a suggested match; ask a supervisor for any other merge"
            )
    return merge_contacts(tx, source_id, target_id, actor=actor, reason=reason)


def link_verified(
    tx: Tx, contact_id: int, kind: str, address: str, verified_by: str, *, actor: str
) -> int:
    """``contact_id`` proved ``(kind, address)``: the identity joins it, or, when another
    contact already owns it verified, the two are one person and merge into that owner (it
    holds the history). Returns the surviving contact."""
    owner = tx.execute(
        select(ContactIdentity.contact_id).where(
            ContactIdentity.kind == kind,
            ContactIdentity.address == address,
            ContactIdentity.verified.is_(True),
        )
    ).scalar_one_or_none()
    if owner is not None:
        if int(owner) != contact_id:
            merge_contacts(
                tx,
                contact_id,
                int(owner),
                actor=actor,
                reason=f"proved {kind} {address} ({verified_by})",
            )
        return int(owner)
    _lock(tx, contact_id)
    contact = _live_contact(tx, contact_id)
    identity_id = int(
        tx.execute(
            insert(ContactIdentity)
            .values(
                contact_id=contact_id,
                kind=kind,
                address=address,
                verified=True,
                verified_by=verified_by,
                data={},
                created_at=tx.now,
            )
            .returning(ContactIdentity.id)
        ).scalar_one()
    )
    field = {"email": "email", "phone": "phone"}.get(kind)
    if field and getattr(contact, field) is None:
        tx.execute(update(Contact).where(Contact.id == contact_id).values({field: address}))
    _link(tx, "link", contact_id, actor, identity_id=identity_id, reason=f"proved by {verified_by}")
    return contact_id


# -- one number, one customer ------------------------------------------------------------
# A phone number verified by SMS (or an attested call) and the same number verified as a
# WhatsApp sender (Meta's signed wa_id, which WhatsApp verified when the number registered)
# are one person: their identities keep their kinds (replies go by the channel's kind) and
# share one contact.
SAME_NUMBER = {"phone": "whatsapp", "whatsapp": "phone"}


def link_same_number(tx: Tx, contact_id: int, identity_id: int, kind: str, address: str) -> None:
    """Record that a new verified ``kind`` identity joined ``contact_id``, which holds the
    same number verified under the other kind (``GET /api/contacts/{id}/links``)."""
    _link(
        tx,
        "link",
        contact_id,
        "system",
        identity_id=identity_id,
        reason=f"{kind} {address}: the same number as its verified {SAME_NUMBER[kind]} identity",
    )


def join_same_number(
    tx: Tx, contact_id: int, identity_id: int, other_contact_id: int, other_identity_id: int
) -> int:
    """Two contacts hold one number verified under both kinds (made before the rule, or by
    two deliveries racing): they are merged into the older, unless an admin split one of
    the two identities off (that decision stands). Returns the contact to use."""
    if contact_id == other_contact_id:
        return contact_id
    split = tx.execute(
        select(ContactLink.id)
        .where(
            ContactLink.action == "split",
            ContactLink.identity_id.in_([identity_id, other_identity_id]),
        )
        .limit(1)
    ).first()
    if split is not None:
        return contact_id
    survivor, merged = sorted((contact_id, other_contact_id))
    address = tx.execute(
        select(ContactIdentity.address).where(ContactIdentity.id == identity_id)
    ).scalar_one()
    merge_contacts(
        tx,
        merged,
        survivor,
        actor="system",
        reason=f"one number: {address} is verified as phone and as WhatsApp",
    )
    return survivor


def contact_links(conn: Connection, contact_id: int) -> list[dict[str, Any]]:
    """Why this contact is what it is: its merges, splits, links and erasure, oldest first."""
    rows = conn.execute(
        select(ContactLink)
        .where(
            or_(ContactLink.contact_id == contact_id, ContactLink.other_contact_id == contact_id)
        )
        .order_by(ContactLink.id)
    )
    return [
        {
            "id": r.id,
            "action": r.action,
            "contact_id": r.contact_id,
            "other_contact_id": r.other_contact_id,
            "identity_id": r.identity_id,
            "actor": r.actor,
            "reason": r.reason,
            "detail": r.detail or {},
            "at": iso(r.created_at),
        }
        for r in rows
    ]


def suggestions(
    conn: Connection,
    contact_id: int,
    limit: int = 10,
    *,
    visible: ColumnElement[bool] | None = None,
) -> list[dict[str, Any]]:
    """Contacts that may be the same person, with why; never linked automatically.
    ``visible`` (router.policy) keeps the contacts the reader may see."""
    _live_contact(conn, contact_id)
    mine = conn.execute(
        select(ContactIdentity.kind, ContactIdentity.address, ContactIdentity.verified).where(
            ContactIdentity.contact_id == contact_id
        )
    ).all()
    hints = conn.execute(
        select(ContactHint.kind, ContactHint.value).where(ContactHint.contact_id == contact_id)
    ).all()
    found: dict[int, list[str]] = {}

    def note(other: int, why: str) -> None:
        if other != contact_id and why not in found.setdefault(other, []):
            found[other].append(why)

    addresses = {a.address for a in mine} | {h.value for h in hints}
    if addresses:
        for row in conn.execute(
            select(ContactIdentity.contact_id, ContactIdentity.kind, ContactIdentity.address)
            .where(ContactIdentity.address.in_(sorted(addresses)))
            .limit(200)
        ):
            note(int(row.contact_id), f"{row.kind} {row.address}")
        for hinted, value in conn.execute(
            select(ContactHint.contact_id, ContactHint.value)
            .where(ContactHint.value.in_(sorted(addresses)))
            .limit(200)
        ):
            note(int(hinted), f"unverified hint {value}")
    name = conn.execute(select(Contact.name).where(Contact.id == contact_id)).scalar_one()
    if name and len(name.strip()) >= 3:
        for other in conn.execute(
            select(Contact.id)
            .where(func.lower(Contact.name) == name.strip().lower(), Contact.id != contact_id)
            .order_by(Contact.id.desc())
            .limit(5)
        ).scalars():
            note(int(other), f"same name {name.strip()}")
    if not found:
        return []
    live = {
        r.id: r
        for r in conn.execute(
            select(Contact.id, Contact.name).where(
                Contact.id.in_(sorted(found)),
                Contact.merged_into_id.is_(None),
                Contact.erased_at.is_(None),
                true() if visible is None else visible,
            )
        )
    }
    out = [
        {"contact_id": cid, "name": live[cid].name, "reasons": reasons}
        for cid, reasons in sorted(found.items(), key=lambda kv: (-len(kv[1]), -kv[0]))
        if cid in live
    ]
    return out[:limit]


# -- web-chat proofs ----------------------------------------------------------------------
def signed_identity_ok(secret: str, customer_id: object, signature: object) -> bool:
    """The site signed its customer id: hex HMAC-SHA256 of the id under the inbox's
    secret, compared in constant time."""
    if not isinstance(customer_id, str) or not isinstance(signature, str):
        return False
    if not _CUSTOMER_ID.match(customer_id) or len(signature) > 128:
        return False
    expected = hmac.new(secret.encode(), customer_id.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature.strip().lower())


def _code_hash(secret: bytes, identity_id: int, kind: str, address: str, code: str) -> str:
    message = f"{identity_id}\x00{kind}\x00{address}\x00{code}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def new_code(tx: Tx, identity_id: int, kind: str, address: str, secret: bytes) -> tuple[int, str]:
    """``(code_id, code)``: a fresh 6-digit code for the visitor ``identity_id`` to prove ``(kind, address)``;
    earlier codes of this visitor are spent. Refused beyond the per-visitor and
    per-address limits."""
    since = tx.now - CODES_WINDOW
    asked = tx.execute(
        select(func.count())
        .select_from(VerificationCode)
        .where(VerificationCode.identity_id == identity_id, VerificationCode.created_at >= since)
    ).scalar_one()
    if asked >= CODES_PER_VISITOR:
        raise Conflict("too many codes asked for: try again later", retry_after=3600)
    sent = tx.execute(
        select(func.count())
        .select_from(VerificationCode)
        .where(
            VerificationCode.kind == kind,
            VerificationCode.address == address,
            VerificationCode.created_at >= since,
        )
    ).scalar_one()
    if sent >= CODES_PER_ADDRESS:
        raise Conflict("too many codes sent to this address: try again later", retry_after=3600)
    tx.execute(
        update(VerificationCode)
        .where(VerificationCode.identity_id == identity_id, VerificationCode.used_at.is_(None))
        .values(used_at=tx.now)
    )
    code = f"{secrets.randbelow(10**6):06d}"
    code_id = tx.execute(
        insert(VerificationCode)
        .values(
            identity_id=identity_id,
            kind=kind,
            address=address,
            code_hash=_code_hash(secret, identity_id, kind, address, code),
            attempts=0,
            expires_at=tx.now + CODE_TTL,
            created_at=tx.now,
        )
        .returning(VerificationCode.id)
    ).scalar_one()
    return int(code_id), code


def check_code(tx: Tx, identity_id: int, code: object, secret: bytes) -> tuple[str, str] | str:
    """``(kind, address)`` when ``code`` is the visitor's pending code, else why not (a
    failed attempt is counted: the caller commits it, it must not raise)."""
    pending = tx.execute(
        select(VerificationCode)
        .where(
            VerificationCode.identity_id == identity_id,
            VerificationCode.used_at.is_(None),
            VerificationCode.expires_at > tx.now,
        )
        .order_by(VerificationCode.id.desc())
        .limit(1)
    ).first()
    if pending is None:
        return "no code is pending (it expired or was used): ask for a new one"
    if pending.attempts >= CODE_ATTEMPTS:
        return "too many wrong codes: ask for a new one"
    tx.execute(
        update(VerificationCode)
        .where(VerificationCode.id == pending.id)
        .values(attempts=VerificationCode.attempts + 1)
    )
    if not isinstance(code, str) or not code.strip().isdigit():
        return "the code is 6 digits"
    digest = _code_hash(secret, identity_id, pending.kind, pending.address, code.strip())
    if not hmac.compare_digest(digest, pending.code_hash):
        left = CODE_ATTEMPTS - pending.attempts - 1
        return f"wrong code ({left} attempts left)" if left else "wrong code: ask for a new one"
    tx.execute(
        update(VerificationCode).where(VerificationCode.id == pending.id).values(used_at=tx.now)
    )
    return str(pending.kind), str(pending.address)


# -- data-protection requests -------------------------------------------------------------
def identity_payload(identity: Any) -> dict[str, Any]:
    return {
        "id": identity.id,
        "kind": identity.kind,
        "address": identity.address,
        "verified": identity.verified,
        "verified_by": identity.verified_by,
    }


def export_contact(conn: Connection, contact_id: int) -> dict[str, Any]:
    """Everything stored about a contact, as JSON."""
    contact = conn.execute(select(Contact).where(Contact.id == contact_id)).first()
    if contact is None:
        raise NotFound(f"no contact {contact_id}")
    conversations = conn.execute(
        select(Conversation).where(Conversation.contact_id == contact_id).order_by(Conversation.id)
    ).all()
    ids = [c.id for c in conversations]
    messages = conn.execute(
        select(Message).where(Message.conversation_id.in_(ids)).order_by(Message.id)
    ).all()
    events = conn.execute(
        select(ConversationEvent)
        .where(ConversationEvent.conversation_id.in_(ids))
        .order_by(ConversationEvent.id)
    ).all()
    return {
        "contact": {
            **{f: getattr(contact, f) for f in (*_FIELDS, "vip", "attributes")},
            "id": contact.id,
            "created_at": iso(contact.created_at),
            "erased_at": iso(contact.erased_at),
        },
        "identities": [
            {**identity_payload(i), "data": i.data or {}, "created_at": iso(i.created_at)}
            for i in conn.execute(
                select(ContactIdentity).where(ContactIdentity.contact_id == contact_id)
            )
        ],
        "unverified_hints": [
            {"kind": h.kind, "value": h.value, "source": h.source, "at": iso(h.created_at)}
            for h in conn.execute(select(ContactHint).where(ContactHint.contact_id == contact_id))
        ],
        "conversations": [
            {
                "id": c.id,
                "channel": c.channel,
                "state": c.state,
                "queue": c.queue,
                "subject": c.subject,
                "tags": c.tags or [],
                "created_at": iso(c.created_at),
                "resolved_at": iso(c.resolved_at),
            }
            for c in conversations
        ],
        "messages": [
            {
                "id": m.id,
                "conversation_id": m.conversation_id,
                "direction": m.direction,
                "author": m.author,
                "text": m.text,
                "subject": m.subject,
                "attachments": m.attachments or [],
                "delivery_status": m.delivery_status,
                "is_note": m.is_note,
                "created_at": iso(m.created_at),
            }
            for m in messages
        ],
        "events": [
            {"conversation_id": e.conversation_id, "kind": e.kind, "at": iso(e.at), "data": e.data}
            for e in events
        ],
        "links": contact_links(conn, contact_id),
    }


def erase_contact(
    tx: Tx, contact_id: int, *, actor: str, reason: str | None = None
) -> dict[str, Any]:
    """Erase a contact: message contents redacted, identities and hints removed, personal
    fields cleared; conversations stay (counts and KPIs) and an audit entry is kept. The
    blob keys of erased attachments are returned for the caller to delete."""
    _lock(tx, contact_id)
    _live_contact(tx, contact_id)
    conversation_ids = list(
        tx.execute(select(Conversation.id).where(Conversation.contact_id == contact_id)).scalars()
    )
    blobs = [
        a.get("blob_key")
        for attachments in tx.execute(
            select(Message.attachments).where(Message.conversation_id.in_(conversation_ids))
        ).scalars()
        for a in attachments or []
        if isinstance(a, dict) and a.get("blob_key")
    ]
    messages = tx.execute(
        update(Message)
        .where(Message.conversation_id.in_(conversation_ids))
        .values(text="", subject=None, attachments=[], data={"erased": True}, identity_id=None)
    ).rowcount
    tx.execute(
        update(Conversation)
        .where(Conversation.id.in_(conversation_ids))
        .values(subject=None, updated_at=tx.now)
    )
    # nothing more goes out to them; the outbox keeps no copy of what was written
    tx.execute(
        update(Outbox)
        .where(
            Outbox.conversation_id.in_(conversation_ids),
            Outbox.state.in_([OutboxState.QUEUED.value, OutboxState.UNCERTAIN.value]),
        )
        .values(state=OutboxState.FAILED.value, last_error="the contact was erased")
    )
    tx.execute(
        update(Outbox).where(Outbox.conversation_id.in_(conversation_ids)).values(payload={})
    )
    identities = list(
        tx.execute(
            select(ContactIdentity.id).where(ContactIdentity.contact_id == contact_id)
        ).scalars()
    )
    tx.execute(delete(VerificationCode).where(VerificationCode.identity_id.in_(identities)))
    tx.execute(delete(ContactIdentity).where(ContactIdentity.contact_id == contact_id))
    tx.execute(delete(ContactHint).where(ContactHint.contact_id == contact_id))
    tx.execute(
        update(Contact)
        .where(Contact.id == contact_id)
        .values(
            name=None,
            email=None,
            phone=None,
            attributes={},
            erased_at=tx.now,
            updated_at=tx.now,
        )
    )
    link_id = _link(
        tx,
        "erase",
        contact_id,
        actor,
        reason=reason,
        detail={
            "messages": messages,
            "identities": len(identities),
            "conversations": conversation_ids,
            "blobs": len(blobs),
        },
    )
    return {
        "contact_id": contact_id,
        "messages_redacted": messages,
        "identities_removed": len(identities),
        "link_id": link_id,
        "blobs": blobs,
    }
