"""The Meta Graph fake answers like Meta, over real HTTP (uvicorn in a thread)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fakes import make_meta_fixtures
from tests.fakes.meta import (
    PAGE_ID,
    PHONE_NUMBER_ID,
    PSID,
    FakeGraph,
    FakeGraphServer,
    batched,
    messenger_text,
    meta_json_bytes,
    sign_meta,
    signed_request,
    wa_text,
)

TOKEN = "EAAG-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIXTURES = Path(__file__).resolve().parents[1] / "channels" / "fixtures" / "meta"


@pytest.fixture
def server() -> Iterator[FakeGraphServer]:
    with FakeGraphServer(access_token=TOKEN, version="v21.0") as running:
        yield running


@pytest.fixture
def fake(server: FakeGraphServer) -> FakeGraph:
    return server.graph


@pytest.fixture
async def client(server: FakeGraphServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.graph_url, timeout=5.0) as http:
        yield http


def _text(psid: str = PSID, text: str = "hello", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "recipient": {"id": psid},
        "messaging_type": "RESPONSE",
        "message": {"text": text},
    }
    body.update(extra)
    return body


def _wa_text(to: str = "16505551234", body: str = "hi") -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": to,
        "type": "text",
        "text": {"body": body, "preview_url": False},
    }


def _template(name: str = "hello_world", code: str = "en_US") -> dict[str, Any]:
    return {
        "messaging_product": "whatsapp",
        "to": "16505551234",
        "type": "template",
        "template": {"name": name, "language": {"code": code}, "components": []},
    }


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert isinstance(error["fbtrace_id"], str) and error["fbtrace_id"]
    return error


# -- Messenger ---------------------------------------------------------------------------------
async def test_messenger_send_ok(client: httpx.AsyncClient, fake: FakeGraph) -> None:
    response = await client.post("/me/messages", json=_text(text="Hi there"), headers=AUTH)
    assert response.status_code == 200
    body = response.json()
    assert body["recipient_id"] == PSID
    assert body["message_id"].startswith("m_")
    assert set(body) == {"recipient_id", "message_id"}
    [sent] = fake.sent
    assert sent["kind"] == "messenger"
    assert sent["path"] == "/v21.0/me/messages"
    assert sent["json"]["message"] == {"text": "Hi there"}
    assert sent["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert sent["message_id"] == body["message_id"]
    assert fake.requests[-1]["status"] == 200


async def test_messenger_token_in_query_and_page_node(client: httpx.AsyncClient) -> None:
    by_query = await client.post("/me/messages", params={"access_token": TOKEN}, json=_text())
    assert by_query.status_code == 200
    by_page = await client.post(f"/{PAGE_ID}/messages", json=_text(), headers=AUTH)
    assert by_page.status_code == 200


async def test_messenger_attachment_reusable(client: httpx.AsyncClient) -> None:
    body = _text()
    body["message"] = {
        "attachment": {
            "type": "image",
            "payload": {"url": "https://example.com/a.jpg", "is_reusable": True},
        }
    }
    response = await client.post("/me/messages", json=body, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["attachment_id"].isdigit()


async def test_messenger_auth_errors(client: httpx.AsyncClient) -> None:
    missing = await client.post("/me/messages", json=_text())
    assert missing.status_code == 400
    error = _error(missing)
    assert error["type"] == "OAuthException"
    assert error["code"] == 2500
    wrong = await client.post(
        "/me/messages", json=_text(), headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 400
    assert _error(wrong)["code"] == 190
    assert "invalid_token" in wrong.headers["www-authenticate"]


async def test_human_agent_tag_accepted_outside_window(
    client: httpx.AsyncClient, fake: FakeGraph
) -> None:
    fake.window_closed.add(PSID)
    tagged = _text(messaging_type="MESSAGE_TAG", tag="HUMAN_AGENT")
    response = await client.post("/me/messages", json=tagged, headers=AUTH)
    assert response.status_code == 200
    assert fake.sent[0]["json"]["tag"] == "HUMAN_AGENT"
    untagged_tag = _text(messaging_type="MESSAGE_TAG")
    refused = await client.post("/me/messages", json=untagged_tag, headers=AUTH)
    assert refused.status_code == 400
    assert _error(refused)["code"] == 100
    fake.human_agent_expired.add(PSID)
    expired = await client.post("/me/messages", json=tagged, headers=AUTH)
    assert _error(expired)["error_subcode"] == 2018278


async def test_window_closed_error_object_shape(client: httpx.AsyncClient, fake: FakeGraph) -> None:
    fake.window_closed.add(PSID)
    response = await client.post("/me/messages", json=_text(), headers=AUTH)
    assert response.status_code == 400
    error = _error(response)
    assert set(error) == {"message", "type", "code", "error_subcode", "fbtrace_id"}
    assert error["type"] == "OAuthException"
    assert error["code"] == 10
    assert error["error_subcode"] == 2018278
    assert "outside of allowed window" in error["message"]
    assert fake.sent == []


@pytest.mark.parametrize(
    ("setup", "psid", "code", "subcode"),
    [
        ("blocked", PSID, 551, 1545041),
        ("bad_recipients", PSID, 100, 2018001),
        (None, "not-a-psid", 100, 2018001),
    ],
)
async def test_messenger_recipient_errors(
    client: httpx.AsyncClient,
    fake: FakeGraph,
    setup: str | None,
    psid: str,
    code: int,
    subcode: int,
) -> None:
    if setup is not None:
        getattr(fake, setup).add(psid)
    response = await client.post("/me/messages", json=_text(psid), headers=AUTH)
    assert response.status_code == 400
    error = _error(response)
    assert (error["code"], error["error_subcode"]) == (code, subcode)


# -- WhatsApp ----------------------------------------------------------------------------------
async def test_whatsapp_text(client: httpx.AsyncClient, fake: FakeGraph) -> None:
    response = await client.post(
        f"/{PHONE_NUMBER_ID}/messages", json=_wa_text("+1 650-555-1234"), headers=AUTH
    )
    assert response.status_code == 200
    body = response.json()
    assert body["messaging_product"] == "whatsapp"
    assert body["contacts"] == [{"input": "+1 650-555-1234", "wa_id": "16505551234"}]
    [message] = body["messages"]
    assert message["id"].startswith("wamid.HBgL")
    assert fake.sent[0]["recipient"] == "16505551234"
    assert fake.sent[0]["kind"] == "whatsapp"


async def test_whatsapp_wa_id_can_differ_from_input(
    client: httpx.AsyncClient, fake: FakeGraph
) -> None:
    fake.wa_id_map["5511987654321"] = "551187654321"  # Brazil: the 9th digit dropped
    response = await client.post(
        f"/{PHONE_NUMBER_ID}/messages", json=_wa_text("5511987654321"), headers=AUTH
    )
    assert response.json()["contacts"] == [{"input": "5511987654321", "wa_id": "551187654321"}]


async def test_whatsapp_template_ok_and_unknown(client: httpx.AsyncClient) -> None:
    ok = await client.post(f"/{PHONE_NUMBER_ID}/messages", json=_template(), headers=AUTH)
    assert ok.status_code == 200
    assert ok.json()["messages"][0]["message_status"] == "accepted"
    unknown = await client.post(
        f"/{PHONE_NUMBER_ID}/messages", json=_template("no_such_template"), headers=AUTH
    )
    assert unknown.status_code == 404
    error = _error(unknown)
    assert error["code"] == 132001
    assert error["message"] == "(#132001) Template name does not exist in the translation"
    assert error["error_data"] == {
        "messaging_product": "whatsapp",
        "details": "template name (no_such_template) does not exist in en_US",
    }
    assert "error_subcode" not in error
    wrong_language = await client.post(
        f"/{PHONE_NUMBER_ID}/messages", json=_template(code="de"), headers=AUTH
    )
    assert _error(wrong_language)["code"] == 132001


async def test_whatsapp_outside_window(client: httpx.AsyncClient, fake: FakeGraph) -> None:
    fake.outside_window.add("16505551234")
    refused = await client.post(f"/{PHONE_NUMBER_ID}/messages", json=_wa_text(), headers=AUTH)
    assert refused.status_code == 400
    error = _error(refused)
    assert error["code"] == 131047
    assert error["message"] == "(#131047) Re-engagement message"
    assert "24 hours" in error["error_data"]["details"]
    template = await client.post(f"/{PHONE_NUMBER_ID}/messages", json=_template(), headers=AUTH)
    assert template.status_code == 200
    # The asynchronous variant: accepted, then a `failed` status webhook.
    fake.window_error_mode = "webhook"
    accepted = await client.post(f"/{PHONE_NUMBER_ID}/messages", json=_wa_text(), headers=AUTH)
    assert accepted.status_code == 200
    [payload] = fake.status_webhooks
    [status] = payload["entry"][0]["changes"][0]["value"]["statuses"]
    assert status["id"] == accepted.json()["messages"][0]["id"]
    assert status["status"] == "failed"
    assert status["errors"][0]["code"] == 131047


async def test_whatsapp_unknown_phone_number_id(client: httpx.AsyncClient) -> None:
    response = await client.post("/999999999/messages", json=_wa_text(), headers=AUTH)
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == 100
    assert error["error_subcode"] == 33
    assert error["type"] == "GraphMethodException"


async def test_whatsapp_auth_is_401(client: httpx.AsyncClient) -> None:
    response = await client.post(f"/{PHONE_NUMBER_ID}/messages", json=_wa_text())
    assert response.status_code == 401
    assert _error(response)["type"] == "OAuthException"


async def test_media_two_step_fetch(
    client: httpx.AsyncClient, fake: FakeGraph, server: FakeGraphServer
) -> None:
    data = b"\xff\xd8\xff\xe0 fake jpeg bytes"
    webhook_media = fake.add_media("1043287463409218", data, "image/jpeg")
    assert webhook_media["id"] == "1043287463409218"
    meta = await client.get("/1043287463409218", headers=AUTH)
    assert meta.status_code == 200
    info = meta.json()
    assert info["messaging_product"] == "whatsapp"
    assert info["mime_type"] == "image/jpeg"
    assert info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["file_size"] == len(data)
    assert info["id"] == "1043287463409218"
    assert info["url"].startswith(server.url + "/media/1043287463409218?")
    async with httpx.AsyncClient(timeout=5.0) as plain:
        anonymous = await plain.get(info["url"])
        assert anonymous.status_code == 401
        download = await plain.get(info["url"], headers=AUTH)
        assert download.status_code == 200
        assert download.content == data
        assert download.headers["content-type"] == "image/jpeg"
        fake.expire_media_url("1043287463409218")
        stale = await plain.get(info["url"], headers=AUTH)
        assert stale.status_code == 404
    no_token = await client.get("/1043287463409218")
    assert no_token.status_code == 401


async def test_profile_fetch(client: httpx.AsyncClient, fake: FakeGraph) -> None:
    fake.profiles[PSID] = {
        "first_name": "Peter",
        "last_name": "Chang",
        "profile_pic": "https://platform-lookaside.fbsbx.com/platform/profilepic/?psid=1",
    }
    response = await client.get(
        f"/{PSID}", params={"fields": "first_name,last_name,profile_pic"}, headers=AUTH
    )
    assert response.status_code == 200
    assert response.json() == {
        "first_name": "Peter",
        "last_name": "Chang",
        "profile_pic": "https://platform-lookaside.fbsbx.com/platform/profilepic/?psid=1",
        "id": PSID,
    }
    unknown = await client.get("/24000000000000999", params={"fields": "first_name"}, headers=AUTH)
    assert unknown.status_code == 400
    assert _error(unknown)["code"] == 10


# -- failure injection -------------------------------------------------------------------------
async def test_rate_limit_injection(client: httpx.AsyncClient, fake: FakeGraph) -> None:
    fake.fail_next(1, status=429, code=4)
    limited = await client.post("/me/messages", json=_text(), headers=AUTH)
    assert limited.status_code == 429
    error = _error(limited)
    assert error["code"] == 4
    assert error["message"] == "(#4) Application request limit reached"
    assert error["is_transient"] is True
    assert "x-app-usage" in limited.headers
    assert fake.sent == []
    again = await client.post("/me/messages", json=_text(), headers=AUTH)
    assert again.status_code == 200
    assert [r["status"] for r in fake.requests] == [429, 200]


async def test_service_unavailable_and_custom_injection(
    client: httpx.AsyncClient, fake: FakeGraph
) -> None:
    fake.fail_next(1, status=500, code=2)
    down = await client.post(f"/{PHONE_NUMBER_ID}/messages", json=_wa_text(), headers=AUTH)
    assert down.status_code == 500
    assert _error(down)["code"] == 2
    fake.fail_next_with({"message": "(#131056) pair rate limit hit", "code": 131056}, 400)
    custom = await client.post(f"/{PHONE_NUMBER_ID}/messages", json=_wa_text(), headers=AUTH)
    assert custom.status_code == 400
    assert custom.json() == {"error": {"message": "(#131056) pair rate limit hit", "code": 131056}}


async def test_hang_then_the_send_still_happens(client: httpx.AsyncClient, fake: FakeGraph) -> None:
    fake.hang_next(1, seconds=0.6)
    with pytest.raises(httpx.ReadTimeout):
        await client.post("/me/messages", json=_text(), headers=AUTH, timeout=0.2)
    assert fake.sent == []
    sent = await fake.wait_for_sent(1, timeout=3.0)  # an uncertain send did go out
    assert sent[0]["recipient"] == PSID
    normal = await client.post("/me/messages", json=_text(), headers=AUTH, timeout=2.0)
    assert normal.status_code == 200


async def test_cdn_and_redirect(
    client: httpx.AsyncClient, fake: FakeGraph, server: FakeGraphServer
) -> None:
    path = fake.add_file("photo.jpg", b"jpeg!", "image/jpeg")
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as plain:
        got = await plain.get(path)
        assert (got.status_code, got.content, got.headers["content-type"]) == (
            200,
            b"jpeg!",
            "image/jpeg",
        )
        assert (await plain.get("/cdn/missing.jpg")).status_code == 404
        redirect = await plain.get(
            "/redirect", params={"to": "http://169.254.169.254/latest/meta-data/"}
        )
        assert redirect.status_code == 302
        assert redirect.headers["location"] == "http://169.254.169.254/latest/meta-data/"


async def test_other_versions_are_unknown(server: FakeGraphServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=5.0) as plain:
        response = await plain.post("/v20.0/me/messages", json=_text(), headers=AUTH)
    assert response.status_code == 400
    assert _error(response)["code"] == 2500


async def test_server_restarts_cleanly() -> None:
    first = FakeGraphServer(access_token=TOKEN).start()
    first.stop()
    first.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=2.0) as plain:
            await plain.get(first.url + "/cdn/x")
    with FakeGraphServer(access_token=TOKEN) as second:
        async with httpx.AsyncClient(timeout=5.0) as plain:
            response = await plain.post(
                second.graph_url + "/me/messages", json=_text(), headers=AUTH
            )
        assert response.status_code == 200


# -- webhook helpers -----------------------------------------------------------------------------
def test_signature_matches_hmac() -> None:
    secret = "app-secret-123"
    body = b'{"object":"page","entry":[]}'
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert sign_meta(secret, body) == expected
    raw, headers = signed_request(secret, messenger_text("hi"))
    assert headers["X-Hub-Signature-256"] == sign_meta(secret, raw)
    assert headers["X-Hub-Signature"].startswith("sha1=")


def test_wire_bytes_escape_like_meta() -> None:
    payload = messenger_text("äöå </b> 50% @me https://x.io/a 🙂", mid="m_1", timestamp=1)
    raw = meta_json_bytes(payload)
    text = raw.decode("ascii")
    assert "\\u00e4\\u00f6\\u00e5" in text
    assert "\\u003C\\/b>" in text
    assert "50\\u0025" in text and "\\u0040me" in text
    assert "https:\\/\\/x.io\\/a" in text
    assert "\\ud83d\\ude42" in text
    assert json.loads(raw) == payload
    assert raw != json.dumps(payload).encode()  # re-serializing breaks the signature


def test_batched_combines_entries() -> None:
    one = messenger_text("a", mid="m_a", timestamp=1)
    two = messenger_text("b", mid="m_b", timestamp=2)
    both = batched(one, two)
    assert [len(e["messaging"]) for e in both["entry"]] == [1, 1]
    merged = batched(one, two, same_entry=True)
    assert [m["message"]["mid"] for m in merged["entry"][0]["messaging"]] == ["m_a", "m_b"]
    with pytest.raises(ValueError):
        batched(one, wa_text("x"))


def test_fixtures_are_current_and_well_formed() -> None:
    files = sorted(FIXTURES.glob("*.json"))
    assert len(files) >= 16
    for path in files:
        payload = json.loads(path.read_text(encoding="utf-8"))
        assert payload["object"] in ("page", "whatsapp_business_account", "instagram")
        assert isinstance(payload["entry"], list) and payload["entry"]
    assert make_meta_fixtures.main(["--check"]) == 0
    status = json.loads((FIXTURES / "whatsapp_status_failed.json").read_text(encoding="utf-8"))
    value = status["entry"][0]["changes"][0]["value"]
    assert "contacts" not in value and "messages" not in value
    assert isinstance(value["statuses"][0]["timestamp"], str)
    text = json.loads((FIXTURES / "messenger_text.json").read_text(encoding="utf-8"))
    assert isinstance(text["entry"][0]["messaging"][0]["timestamp"], int)
