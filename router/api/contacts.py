"""Contacts: read and edit a contact; custom attributes are checked against the active
ruleset's ``attributes:`` declarations."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, String, cast, select, update

from router import policy
from router.api.deps import get_runtime, needs
from router.db import Tx
from router.exceptions import InvalidInput, NotFound
from router.identity import (
    contact_links,
    erase_contact,
    export_contact,
    identity_payload,
    merge_as,
    split_identity,
    suggestions,
)
from router.models import Contact, ContactHint, ContactIdentity, Message
from router.policy import Caller
from router.runtime import Runtime
from router.serialize import iso
from routing_rules import FactType
from routing_rules.facts import is_number

router = APIRouter(prefix="/api/contacts", tags=["contacts"])


def contact_view(conn: Connection, contact_id: int) -> dict[str, Any]:
    contact = conn.execute(select(Contact).where(Contact.id == contact_id)).first()
    if contact is None:
        raise NotFound(f"no contact {contact_id}")
    identities = conn.execute(
        select(ContactIdentity)
        .where(ContactIdentity.contact_id == contact_id)
        .order_by(ContactIdentity.id)
    ).all()
    hints = conn.execute(
        select(ContactHint).where(ContactHint.contact_id == contact_id).order_by(ContactHint.id)
    ).all()
    return {
        "id": contact.id,
        "name": contact.name,
        "email": contact.email,
        "phone": contact.phone,
        "language": contact.language,
        "tier": contact.tier,
        "vip": contact.vip,
        "attributes": contact.attributes or {},
        "merged_into_id": contact.merged_into_id,
        "created_at": iso(contact.created_at),
        "identities": [identity_payload(i) for i in identities],
        "unverified_hints": [{"kind": h.kind, "value": h.value, "source": h.source} for h in hints],
    }


class ContactPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200)
    language: str | None = Field(None, pattern=r"^[a-z]{2}$")
    tier: str | None = Field(None, max_length=64)
    vip: bool | None = None
    attributes: dict[str, Any] | None = None


def _check_attributes(values: dict[str, Any], declared: dict[str, FactType]) -> None:
    for name, value in values.items():
        if name not in declared:
            raise InvalidInput(
                f'unknown attribute "{name}" (declare it under attributes: in rules.yaml)',
                field=f"attributes.{name}",
            )
        if value is None:
            continue
        kind = declared[name]
        ok = (
            (kind is FactType.NUMBER and is_number(value))
            or (kind is FactType.STRING and isinstance(value, str))
            or (kind is FactType.BOOL and isinstance(value, bool))
        )
        if not ok:
            raise InvalidInput(
                f'attribute "{name}" must be a {kind.value}', field=f"attributes.{name}"
            )


def _patch(tx: Tx, contact_id: int, patch: ContactPatch) -> None:
    current = tx.execute(select(Contact.attributes).where(Contact.id == contact_id)).first()
    if current is None:
        raise NotFound(f"no contact {contact_id}")
    values = patch.model_dump(exclude_unset=True, exclude={"attributes"})
    if patch.attributes is not None:
        merged = {**(current.attributes or {}), **patch.attributes}
        values["attributes"] = {k: v for k, v in merged.items() if v is not None}
    values["updated_at"] = tx.now
    tx.execute(update(Contact).where(Contact.id == contact_id).values(**values))


@router.get("/{contact_id}", summary="A contact with verified identities and unverified hints")
async def get_contact(
    contact_id: int,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.READ_CONTACT)),
) -> dict[str, Any]:
    return await runtime.db.read(contact_view, contact_id)


@router.patch(
    "/{contact_id}", summary="Edit a contact (attributes are validated against rules.yaml)"
)
async def patch_contact(
    contact_id: int,
    patch: ContactPatch,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.EDIT_CONTACT)),
) -> dict[str, Any]:
    policy.check_contact_edit(caller, patch.model_fields_set, runtime.rules.active)
    if patch.attributes:
        _check_attributes(patch.attributes, runtime.rules.ruleset.attributes)
    await runtime.db.write(_patch, contact_id, patch)
    return await runtime.db.read(contact_view, contact_id)


# -- one customer across channels (docs/identity.md) ---------------------------------------
class Merge(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_contact: int = Field(description="the contact merged away into this one")
    reason: str | None = Field(None, max_length=500)


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500)


@router.get("/{contact_id}/suggestions", summary="Contacts that may be the same person, and why")
async def get_suggestions(
    contact_id: int,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.READ_CONTACT)),
) -> list[dict[str, Any]]:
    visible = policy.visible_contacts(caller)
    return await runtime.db.read(lambda c: suggestions(c, contact_id, visible=visible))


@router.get("/{contact_id}/links", summary="The merges, splits, links and erasure of a contact")
async def get_links(
    contact_id: int,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.READ_CONTACT)),
) -> list[dict[str, Any]]:
    return await runtime.db.read(contact_links, contact_id)


@router.post(
    "/{contact_id}/merge",
    summary="Merge another contact into this one (agents: suggested matches only)",
)
async def post_merge(
    contact_id: int,
    body: Merge,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.MERGE_CONTACTS)),
) -> dict[str, Any]:
    return await runtime.db.write(
        merge_visible, caller, contact_id, body.from_contact, runtime.rules.active, body.reason
    )


def merge_visible(
    tx: Tx,
    caller: Caller,
    contact_id: int,
    from_contact: int,
    ruleset: Any,
    reason: str | None,
) -> dict[str, Any]:
    """A merge by ``caller``, who must see both contacts (the REST route and the agent
    socket's ``merge_contacts``)."""
    policy.check_target(tx.conn, caller, policy.Target.CONTACT, contact_id, ruleset)
    policy.check_target(tx.conn, caller, policy.Target.CONTACT, from_contact, ruleset)
    return merge_as(
        tx,
        contact_id,
        from_contact,
        actor=f"user:{caller.user_id}",
        any_pair=policy.may_merge_any(caller),
        reason=reason,
    )


@router.post(
    "/{contact_id}/identities/{identity_id}/split",
    summary="Split an identity (and the conversations it started) out to a contact of its own",
)
async def post_split(
    contact_id: int,
    identity_id: int,
    body: Reason | None = None,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.SPLIT_CONTACT)),
) -> dict[str, Any]:
    def split(tx: Tx) -> dict[str, Any]:
        owner = tx.execute(
            select(ContactIdentity.contact_id).where(ContactIdentity.id == identity_id)
        ).scalar_one_or_none()
        if owner != contact_id:
            raise NotFound(f"contact {contact_id} has no identity {identity_id}")
        return split_identity(
            tx, identity_id, actor=f"user:{caller.user_id}", reason=body.reason if body else None
        )

    return await runtime.db.write(split)


@router.get("/{contact_id}/export", summary="Everything stored about a contact (data requests)")
async def get_export(
    contact_id: int,
    runtime: Runtime = Depends(get_runtime),
    _: Caller = Depends(needs(policy.CONTACT_DATA)),
) -> dict[str, Any]:
    return await runtime.db.read(export_contact, contact_id)


@router.post(
    "/{contact_id}/erase",
    summary="Erase a contact: messages redacted, identities removed, an audit entry kept",
)
async def post_erase(
    contact_id: int,
    body: Reason | None = None,
    runtime: Runtime = Depends(get_runtime),
    caller: Caller = Depends(needs(policy.CONTACT_DATA)),
) -> dict[str, Any]:
    result = await runtime.db.write(
        erase_contact,
        contact_id,
        actor=f"user:{caller.user_id}",
        reason=body.reason if body else None,
    )
    blobs = result.pop("blobs")
    still_used = await runtime.db.read(_blobs_in_use, blobs)
    removed = 0
    delete = getattr(runtime.blobs, "delete", None)
    for key in blobs:
        if key not in still_used and delete is not None:
            removed += bool(await delete(key))
    return {**result, "attachments_deleted": removed}


def _blobs_in_use(conn: Connection, keys: list[str]) -> set[str]:
    """Blobs are stored by content: one erased here may still belong to someone else."""
    used: set[str] = set()
    for key in set(keys):
        hit = conn.execute(
            select(Message.id).where(cast(Message.attachments, String).contains(key)).limit(1)
        ).first()
        if hit is not None:
            used.add(key)
    return used
