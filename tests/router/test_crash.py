"""Crash tests: a real ``omniroute serve`` killed (SIGKILL) at named failpoints, restarted,
and the database checked with exact counts. Nothing accepted is lost; ``new`` conversations
get routed; the outbox follows the documented semantics for sends a crash interrupted."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, select, text

from channels.fake import read_sent_log
from router.models import Conversation, Message, Outbox, RoutingDecision
from tests import peers
from tests.support import FAKE_SECRET, ServerProcess, make_settings, server_env, signed


def crash_channels(sent_log: Path, policy: str) -> str:
    return (
        "version: 1\ninboxes:\n"
        f'  sms: {{channel: sms, provider: fake, secret: "{FAKE_SECRET}", sent_log: "{sent_log}", uncertain_policy: {policy}}}\n'
    )


@pytest.fixture
def crash_setup(tmp_path: Path, sqlite_url: str) -> Any:
    def make(policy: str = "check") -> tuple[ServerProcess, Path, Any]:
        sent_log = tmp_path / "sent.jsonl"
        settings = make_settings(
            tmp_path / "conf", sqlite_url, channels=crash_channels(sent_log, policy)
        )
        server = ServerProcess(server_env(settings, peers.free_port()), tmp_path / "server.log")
        engine = create_engine(sqlite_url.replace("sqlite+aiosqlite", "sqlite"))
        return server, sent_log, engine

    return make


def counts(engine: Any) -> dict[str, Any]:
    with engine.connect() as conn:

        def n(model: Any, *where: Any) -> int:
            return int(
                conn.execute(select(func.count()).select_from(model).where(*where)).scalar_one()
            )

        return {
            "messages_in": n(Message, Message.direction == "in"),
            "conversations": n(Conversation),
            "new": n(Conversation, Conversation.state == "new"),
            "decisions": n(RoutingDecision),
            "outbox": dict(
                conn.execute(select(Outbox.state, func.count()).group_by(Outbox.state)).all()
            ),
            "uncertain_resends": int(
                conn.execute(
                    select(func.coalesce(func.sum(Outbox.uncertain_resends), 0))
                ).scalar_one()
            ),
        }


def deliver(server: ServerProcess, external_id: str, text_: str = "hello") -> int | None:
    body, headers = signed(
        {"messages": [{"id": external_id, "from": "+4917099990000", "text": text_}]}
    )
    try:
        return httpx.post(
            f"{server.url}/webhooks/fake/sms", content=body, headers=headers, timeout=10
        ).status_code
    except httpx.HTTPError:
        return None  # the server died before answering: the provider will retry


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_killed_after_the_ingest_commit_loses_nothing_and_the_retry_is_deduplicated(
    crash_setup: Any,
) -> None:
    server, sent_log, engine = crash_setup()
    server.start({"OMNIROUTE_FAILPOINTS": "after_ingest_commit"})
    try:
        assert deliver(server, "crash-1") is None  # killed before the 2xx
        assert server.wait_exit() == -9
        # On SQLite the routing commits with the ingest (one writer, one transaction): the
        # conversation is routed and its automatic reply queued, not yet sent.
        assert counts(engine) == {
            "messages_in": 1,
            "conversations": 1,
            "new": 0,
            "decisions": 1,
            "outbox": {"queued": 1},
            "uncertain_resends": 0,
        }
        server.start()
        assert deliver(server, "crash-1") == 200  # the provider's retry
        wait_until(lambda: counts(engine)["outbox"].get("sent") == 1)
        assert counts(engine) == {
            "messages_in": 1,
            "conversations": 1,
            "new": 0,
            "decisions": 1,
            "outbox": {"sent": 1},
            "uncertain_resends": 0,
        }
        assert len(read_sent_log(str(sent_log))) == 1
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("failpoint", "policy", "sends", "resends"),
    [
        (
            "before_outbox_send",
            "check",
            1,
            1,
        ),  # never reached the provider: checked, then sent once
        ("after_provider_send", "check", 1, 0),  # the provider has it: recorded as sent, no resend
        ("after_provider_send", "resend", 2, 1),  # policy resend: one duplicate, reported
        ("after_provider_send", "ask", 1, 0),  # left for the agent to decide
    ],
)
def test_killed_inside_a_send(
    crash_setup: Any, failpoint: str, policy: str, sends: int, resends: int
) -> None:
    server, sent_log, engine = crash_setup(policy)
    server.start({"OMNIROUTE_FAILPOINTS": failpoint})
    try:
        assert deliver(server, "out-1") == 200
        assert server.wait_exit() == -9  # the auto-reply's send killed it
        assert counts(engine)["outbox"] == {"sending": 1}
        assert len(read_sent_log(str(sent_log))) == (1 if failpoint == "after_provider_send" else 0)
        server.start()
        expected_state = "uncertain" if policy == "ask" else "sent"
        wait_until(lambda: counts(engine)["outbox"].get(expected_state) == 1)
        after = counts(engine)
        assert after["outbox"] == {expected_state: 1}
        assert after["uncertain_resends"] == resends
        assert len(read_sent_log(str(sent_log))) == sends
        if policy == "ask":
            # the outbox row turns uncertain first, then (in the next write) the message
            # tells the agent: wait for both, not for the first alone

            def status() -> tuple[Any, ...]:
                with engine.connect() as conn:
                    return tuple(
                        conn.execute(
                            text(
                                "SELECT delivery_status, error FROM messages"
                                " WHERE direction = 'out'"
                            )
                        ).one()
                    )

            wait_until(lambda: status()[0] == "uncertain")
            assert status() == ("uncertain", "may not have been sent; resend?")
    finally:
        server.kill()


def test_a_second_serve_on_the_same_sqlite_file_is_refused(
    crash_setup: Any, tmp_path: Path
) -> None:
    server, _, _ = crash_setup()
    server.start()
    try:
        second = ServerProcess(
            {
                **{k: v for k, v in server.env.items() if k.startswith("OMNIROUTE_")},
                "OMNIROUTE_PORT": str(peers.free_port()),
            },
            tmp_path / "second.log",
        )
        second.start(wait=False)
        assert second.wait_exit() == 2
        assert "another omniroute process is serving" in second.log()
        assert "SQLite allows one process per database" in second.log()
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("failpoint", "resends"),
    [("before_outbox_send", 1), ("after_provider_send", 0)],
)
def test_twilio_send_killed_inside_is_checked_with_twilio_before_any_resend(
    tmp_path: Path, sqlite_url: str, failpoint: str, resends: int
) -> None:
    from urllib.parse import urlencode

    from twilio.request_validator import RequestValidator

    from tests.channels.test_twilio_sms import sms_params
    from tests.fakes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, FakeTwilioServer

    with FakeTwilioServer() as twilio:
        inbox = (
            f"  tw: {{channel: sms, provider: twilio, account_sid: {DEFAULT_ACCOUNT_SID}, "
            f"auth_token: {DEFAULT_AUTH_TOKEN}, from_number: '+15550000000', "
            f"api_base_url: '{twilio.url}'}}\n"
        )
        settings = make_settings(
            tmp_path / "conf", sqlite_url, channels="version: 1\ninboxes:\n" + inbox
        )
        server = ServerProcess(server_env(settings, peers.free_port()), tmp_path / "server.log")
        engine = create_engine(sqlite_url.replace("sqlite+aiosqlite", "sqlite"))
        server.start({"OMNIROUTE_FAILPOINTS": failpoint})
        try:
            params = sms_params("hello", From="+14155550100")
            path = "/webhooks/twilio/tw/sms"
            # signed over the public URL the server is configured with (server_env's)
            signature = RequestValidator(DEFAULT_AUTH_TOKEN).compute_signature(
                server.url.rstrip("/") + path, params
            )
            response = httpx.post(
                server.url + path,
                content=urlencode(params).encode(),
                headers={
                    "x-twilio-signature": signature,
                    "content-type": "application/x-www-form-urlencoded",
                },
                timeout=10,
            )
            assert response.status_code == 200
            assert server.wait_exit() == -9  # the auto-reply's send killed it
            assert counts(engine)["outbox"] == {"sending": 1}
            sent_before = len(twilio.fake.messages)
            assert sent_before == (1 if failpoint == "after_provider_send" else 0)
            server.start()
            wait_until(lambda: counts(engine)["outbox"].get("sent") == 1)
            assert counts(engine)["uncertain_resends"] == resends
            assert len(twilio.fake.messages) == 1  # Twilio has it once either way
        finally:
            server.kill()


def test_killed_again_and_again_while_messages_flow_loses_and_doubles_nothing(
    crash_setup: Any,
) -> None:
    """SIGKILL at random moments, five times, while 400 signed webhooks from 400 customers
    flow in with the provider's retries (each delivery is retried until it gets a 200), and
    each new conversation sends an automatic reply. Every message is stored once, every
    conversation routed, every reply sent once (the inbox checks the provider before any
    resend of a send a kill interrupted)."""
    server, sent_log, engine = crash_setup("check")
    server.start()
    total, rng, done = 400, random.Random(11), threading.Event()
    retries = [0]

    def one(n: int) -> None:
        body, headers = signed(
            {"messages": [{"id": f"flow-{n}", "from": f"+49170{n:07d}", "text": f"message {n}"}]}
        )
        while True:
            try:
                status = httpx.post(
                    f"{server.url}/webhooks/fake/sms", content=body, headers=headers, timeout=10
                ).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                return
            retries[0] += 1
            time.sleep(0.1)  # the provider retries later

    def killer() -> None:
        for _ in range(5):
            if done.wait(rng.uniform(0.5, 2.0)):
                return
            server.kill()
            server.start()

    chaos = threading.Thread(target=killer)
    chaos.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(total)))
        done.set()
        chaos.join()
        if server.proc is None or server.proc.poll() is not None:
            server.start()
        wait_until(lambda: counts(engine)["outbox"].get("sent") == total, timeout=120)
        final = counts(engine)
        assert (final["messages_in"], final["conversations"], final["new"]) == (total, total, 0)
        assert final["decisions"] == total
        with engine.connect() as conn:
            distinct = conn.execute(
                select(func.count(func.distinct(Message.external_id))).where(
                    Message.direction == "in"
                )
            ).scalar_one()
        assert distinct == total
        sends = [entry["message_id"] for entry in read_sent_log(str(sent_log))]
        assert len(sends) == len(set(sends)) == total  # each reply reached the provider once
        assert retries[0] > 0  # the kills did land during deliveries
    finally:
        done.set()
        chaos.join()
        server.kill()
