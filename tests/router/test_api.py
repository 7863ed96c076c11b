"""REST basics: health, readiness, metrics, roles, contacts, password change."""

from __future__ import annotations

import httpx
from sqlalchemy import select

from router.auth import create_user
from router.models import Contact
from router.runtime import Runtime
from tests.router.test_pipeline import settle
from tests.support import post_fake


async def token_for(runtime: Runtime, name: str, role: str) -> str:
    _, token = await runtime.db.write(create_user, name, role)
    return str(token)


async def admin_token(runtime: Runtime) -> str:
    return await token_for(runtime, "root", "admin")


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_health_ready_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "reasons": []}
    metrics = (await client.get("/metrics")).text
    assert (
        "omniroute_routing_latency_seconds_bucket" in metrics
        and "omniroute_outbox_backlog" in metrics
    )


async def test_every_response_carries_the_security_headers(client: httpx.AsyncClient) -> None:
    for response in (
        await client.get("/healthz"),
        await client.get("/api/admin/rules"),  # an error response too
        await client.get("/widget.js"),
    ):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-frame-options"] == "DENY"
        assert len(response.headers.get_list("x-frame-options")) == 1


async def test_roles_are_enforced(runtime: Runtime, client: httpx.AsyncClient) -> None:
    agent = await token_for(runtime, "anna", "agent")
    assert (await client.get("/api/admin/rules")).status_code == 401
    assert (await client.get("/api/admin/rules", headers=auth("not-a-token"))).status_code == 401
    forbidden = await client.get("/api/admin/rules", headers=auth(agent))
    assert (
        forbidden.status_code == 403 and forbidden.json()["message"] == "this needs the admin role"
    )
    me = await client.get("/api/me", headers=auth(agent))
    assert me.json()["name"] == "anna" and me.json()["role"] == "agent"


async def test_contacts_get_and_patch_with_typed_attributes(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    # a supervisor: vip, language and attributes are read by routing (an agent may not
    # change them, and a user without an agent profile sees no contact: test_authz.py)
    agent = await token_for(runtime, "sue", "supervisor")
    await post_fake(
        client,
        "sms",
        {
            "id": "c1",
            "from": "+4917012345670",
            "text": "hi",
            "name": "Ann",
            "hints": {"email": "claimed@example.com"},
        },
    )
    await settle(runtime)
    contact_id = await runtime.db.read(lambda c: c.execute(select(Contact.id)).scalar_one())
    got = (await client.get(f"/api/contacts/{contact_id}", headers=auth(agent))).json()
    assert got["identities"] == [
        {
            "id": got["identities"][0]["id"],
            "kind": "phone",
            "address": "+4917012345670",
            "verified": True,
            "verified_by": None,
        }
    ]
    assert got["unverified_hints"] == [
        {"kind": "email", "value": "claimed@example.com", "source": "channel"}
    ]
    patched = await client.patch(
        f"/api/contacts/{contact_id}",
        headers=auth(agent),
        json={"vip": True, "language": "de", "attributes": {"plan": "gold", "ltv": 1200}},
    )
    assert patched.status_code == 200
    assert (patched.json()["vip"], patched.json()["language"], patched.json()["attributes"]) == (
        True,
        "de",
        {"plan": "gold", "ltv": 1200},
    )
    wrong_type = await client.patch(
        f"/api/contacts/{contact_id}", headers=auth(agent), json={"attributes": {"ltv": "lots"}}
    )
    assert (
        wrong_type.status_code == 422
        and wrong_type.json()["message"] == 'attribute "ltv" must be a number'
    )
    undeclared = await client.patch(
        f"/api/contacts/{contact_id}", headers=auth(agent), json={"attributes": {"shoe": 42}}
    )
    assert (
        undeclared.status_code == 422
        and "declare it under attributes:" in undeclared.json()["message"]
    )
    bad_field = await client.patch(
        f"/api/contacts/{contact_id}", headers=auth(agent), json={"language": "german"}
    )
    assert (
        bad_field.status_code == 422 and bad_field.json()["errors"][0]["where"] == "body.language"
    )
    assert (await client.get("/api/contacts/999999", headers=auth(agent))).status_code == 404


async def test_password_change(runtime: Runtime, client: httpx.AsyncClient) -> None:
    token = await token_for(runtime, "ben", "agent")
    assert (
        await client.post("/api/me/password", headers=auth(token), json={"new": "short"})
    ).status_code == 422
    assert (
        await client.post(
            "/api/me/password", headers=auth(token), json={"new": "correct horse battery"}
        )
    ).json() == {"changed": True}
    # now the current password is required
    wrong = await client.post(
        "/api/me/password", headers=auth(token), json={"current": "nope", "new": "another long one"}
    )
    assert wrong.status_code == 403
    right = await client.post(
        "/api/me/password",
        headers=auth(token),
        json={"current": "correct horse battery", "new": "another long one"},
    )
    assert right.status_code == 200
