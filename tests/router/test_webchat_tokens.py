"""Web-chat visitor tokens are minted by the server (docs/security.md, "Web-chat visitor
tokens"): a made-up token is refused and counts as a new visitor, so it is no way around
the new-visitor limit; a minted token resumes, across a restart too; a token issued before
tokens were signed still resumes its visitor's chat."""

from __future__ import annotations

import json
import secrets
import uuid
from pathlib import Path

import websockets

from channels.webchat import WebChatChannel, minted, new_visitor_token, visitor_address
from tests.support import (
    AGENT_RULES,
    WEB_CHANNELS,
    connect_visitor,
    live_server,
    make_settings,
    started_runtime,
    ws_url,
)

LIMITED = WEB_CHANNELS.replace(
    "messages_per_minute_per_visitor: 600",
    "new_visitors_per_minute_per_ip: 3, messages_per_minute_per_visitor: 600",
)


def test_only_the_key_that_minted_a_token_verifies_it() -> None:
    key, other = secrets.token_bytes(32), secrets.token_bytes(32)
    token = new_visitor_token(key)
    assert len(token) == 64 and visitor_address(token) is not None
    assert minted(key, token) and not minted(other, token)
    forged = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert not minted(key, forged)
    assert not minted(key, secrets.token_urlsafe(48))  # 64 characters, never minted
    assert not minted(key, secrets.token_urlsafe(32))  # the old 43-character format


async def test_a_made_up_token_is_refused_and_counted_as_a_new_visitor(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(tmp_path / "conf", db_url, channels=LIMITED, rules=AGENT_RULES)
    async with started_runtime(settings) as runtime, live_server(runtime) as base:
        visitor, welcome = await connect_visitor(base)
        minted_token = welcome["token"]
        await visitor.send({"type": "message", "client_id": str(uuid.uuid4()), "text": "hi"})
        await visitor.wait_for(lambda f: f.get("type") == "ack")
        await visitor.close()
        # two made-up tokens (today's 43-character format and the signed one's length):
        # each is refused plainly and gets a fresh token, as a new visitor
        for made_up in (secrets.token_urlsafe(32), secrets.token_urlsafe(48)):
            client, again = await connect_visitor(base, token=made_up, last_seq=5)
            refused = client.frames[0]
            assert (refused["type"], refused["code"]) == ("error", "token_rejected")
            assert again["token"] not in (made_up, minted_token) and again["history"] == []
            assert again["last_seq"] == 0  # a new visitor's stream, not the claimed position
            await client.close()
        # the new-visitor budget (3 a minute) is spent: a fourth made-up token is refused
        ws = await websockets.connect(
            ws_url(base, "/ws/chat?inbox=web"), origin="https://shop.example"
        )  # type: ignore[arg-type]
        await ws.send(json.dumps({"type": "hello", "token": secrets.token_urlsafe(32)}))
        assert json.loads(await ws.recv())["code"] == "token_rejected"
        try:
            await ws.recv()
            raise AssertionError("the socket should have been closed")
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None
            assert (closed.rcvd.code, closed.rcvd.reason) == (
                1008,
                "rate limit: too many new visitors",
            )
        # a minted token is a returning visitor, not a new one: it still resumes
        back, resumed = await connect_visitor(base, token=minted_token)
        assert resumed["token"] == minted_token
        assert [m["text"] for m in resumed["history"]] == ["hi"]
        assert not [f for f in back.frames if f.get("type") == "error"]
        await back.close()


async def test_tokens_resume_across_a_restart_and_old_tokens_keep_their_chat(
    tmp_path: Path, sqlite_url: str
) -> None:
    settings = make_settings(
        tmp_path / "conf", sqlite_url, channels=WEB_CHANNELS, rules=AGENT_RULES
    )
    # a visitor from before tokens were signed: a plain random token, their chat stored
    legacy = secrets.token_urlsafe(32)
    async with started_runtime(settings) as runtime:
        channel = runtime.channels["web"]
        assert isinstance(channel, WebChatChannel)
        address = visitor_address(legacy)
        assert address is not None
        await runtime.ingest(
            "web", [channel.inbound(address, str(uuid.uuid4()), "from before the upgrade")]
        )
        async with live_server(runtime) as base:
            visitor, welcome = await connect_visitor(base)  # a visitor who has not written
            fresh = welcome["token"]
            await visitor.close()
    async with started_runtime(settings) as runtime, live_server(runtime) as base:
        for token, history in ((fresh, []), (legacy, ["from before the upgrade"])):
            client, again = await connect_visitor(base, token=token)
            assert again["token"] == token
            assert [m["text"] for m in again["history"]] == history
            assert not [f for f in client.frames if f.get("type") == "error"]
            await client.close()
