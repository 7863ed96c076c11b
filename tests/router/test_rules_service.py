"""The active ruleset in the server: the database is the source of truth; the file is
imported only when its content changes; a bad file or a ruleset that would orphan open
conversations never replaces a good one; every process switches within seconds."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from adapters.bus import RedisBus
from adapters.clock import FakeClock
from router.models import Queue, QueueMember
from router.models import Ruleset as RulesetRow
from router.runtime import Runtime
from router.settings import Settings
from tests import peers
from tests.router.test_api import admin_token, auth
from tests.router.test_pipeline import rows, settle
from tests.support import RULES, make_settings, post_fake, started_runtime

NEW_RULES = RULES.replace("  sales: {}\n", "  sales: {}\n  vip-desk: {members: [anna]}\n")


async def versions(runtime: Runtime) -> list[tuple[str, str]]:
    return [(r.source, r.version) for r in await rows(runtime, RulesetRow)]


async def test_put_validates_and_activates_atomically(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    token = await admin_token(runtime)
    bad = await client.put(
        "/api/admin/rules",
        headers=auth(token),
        content=b"version: 1\nqueues: {q: {}}\ndefault: {queue: nope}\n",
    )
    assert bad.status_code == 422
    assert bad.json()["errors"] == [
        {"line": 3, "col": 18, "where": "default.queue", "message": 'unknown queue "nope"'}
    ]
    assert len(await versions(runtime)) == 1  # nothing changed
    good = await client.put("/api/admin/rules", headers=auth(token), content=NEW_RULES.encode())
    assert good.status_code == 200 and "vip-desk" in good.json()["queues"]
    assert runtime.rules.ruleset.version == good.json()["version"]
    assert [q.name for q in await rows_q(runtime)] == ["billing", "general", "sales", "vip-desk"]
    members = await runtime.db.read(
        lambda c: c.execute(select(QueueMember.queue, QueueMember.user_name)).all()
    )
    assert [tuple(m) for m in members] == [("vip-desk", "anna")]
    status = (await client.get("/api/admin/rules", headers=auth(token))).json()
    assert status["active"]["source"] == "api" and status["active"]["activated_by"] == "api:root"
    assert [p["ruleset_version"] for p in status["processes"]] == [good.json()["version"]]


async def rows_q(runtime: Runtime) -> list[Queue]:
    return await runtime.db.read(
        lambda c: list(c.execute(select(Queue).where(Queue.active.is_(True)).order_by(Queue.name)))
    )


async def test_removing_a_queue_with_open_conversations_is_refused(
    runtime: Runtime, client: httpx.AsyncClient
) -> None:
    token = await admin_token(runtime)
    await post_fake(client, "sms", {"id": "r1", "from": "+4917012345671", "text": "refund"})
    await post_fake(client, "sms", {"id": "r2", "from": "+4917012345672", "text": "refund"})
    await settle(runtime)
    without_billing = RULES.replace("  billing: {skills: {billing: 3}}\n", "").replace(
        "queue: billing", "queue: sales"
    )
    refused = await client.put(
        "/api/admin/rules", headers=auth(token), content=without_billing.encode()
    )
    assert refused.status_code == 422
    assert (
        refused.json()["message"]
        == 'the ruleset removes queues that still hold open conversations: "billing" (2 open conversations)'
    )
    assert refused.json()["queues"] == {"billing": 2}
    assert "billing" in runtime.rules.ruleset.queues


async def test_file_is_imported_only_when_its_content_changes(
    runtime: Runtime, settings: Settings
) -> None:
    first = await versions(runtime)
    assert [s for s, _ in first] == ["file"]
    assert await runtime.rules.import_file() is None  # same bytes: nothing happens
    await runtime.rules.put(NEW_RULES.encode(), "api:root")
    assert (
        await runtime.rules.import_file() is None
    )  # the API activation stays while the file is unchanged
    assert runtime.rules.ruleset.version == (await versions(runtime))[-1][1]
    assert (await versions(runtime))[-1][0] == "api"
    settings.rules_path.write_text(RULES + "# edited\n")
    report = await runtime.rules.import_file()
    assert report is not None and report.errors == []
    assert [s for s, _ in await versions(runtime)] == ["file", "api", "file"]
    assert runtime.rules.ruleset.text.endswith("# edited\n")


async def test_a_bad_file_never_replaces_a_good_one_and_its_errors_are_shown(
    runtime: Runtime, settings: Settings, client: httpx.AsyncClient
) -> None:
    good = runtime.rules.ruleset.version
    settings.rules_path.write_text(
        RULES.replace("queue: billing, priority: high", "queue: biling, priority: high")
    )
    report = await runtime.rules.import_file()
    assert (
        report is not None
        and report.errors[0]["message"] == 'unknown queue "biling" (did you mean "billing"?)'
    )
    assert runtime.rules.ruleset.version == good
    token = await admin_token(runtime)
    status = (await client.get("/api/admin/rules", headers=auth(token))).json()
    assert status["last_load"]["errors"][0]["where"] == "rules[0].then.queue"
    assert status["processes"][0]["last_error"]["errors"][0]["line"] == 12


async def test_restart_does_not_reimport_an_unchanged_file(
    settings: Settings, clock: FakeClock
) -> None:
    async with started_runtime(settings, clock) as rt:
        await rt.rules.put(NEW_RULES.encode(), "api:root")
        api_version = rt.rules.ruleset.version
    async with started_runtime(settings, clock) as rt:
        assert rt.rules.ruleset.version == api_version
        assert [s for s, _ in await versions(rt)] == ["file", "api"]


async def test_a_second_process_switches_by_polling(pg_settings: Settings) -> None:
    other = pg_settings.model_copy(update={"rules_poll_interval": 0.1, "process_id": "other"})
    async with started_runtime(pg_settings) as one, started_runtime(other, workers=True) as two:
        assert one.bus is not two.bus  # separate in-process buses: only the poll can tell
        await one.rules.put(NEW_RULES.encode(), "api:root")
        await wait_for(
            lambda: two.rules.active is not None and "vip-desk" in two.rules.active.queues
        )


async def test_a_second_process_switches_on_the_bus_notice(tmp_path: Path) -> None:
    redis_url = peers.need(peers.redis_test_url)
    with peers.need(peers.pg_test_database) as url:
        from router.migrate import upgrade

        await asyncio.to_thread(upgrade, url)
        base = make_settings(
            tmp_path / "conf",
            url,
            redis_url=redis_url,
            redis_prefix=peers.unique_prefix(),
            rules_poll_interval=3600,
        )
        other = base.model_copy(update={"process_id": "other"})
        async with started_runtime(base) as one, started_runtime(other) as two:
            assert isinstance(two.bus, RedisBus)
            await one.rules.put(NEW_RULES.encode(), "api:root")
            await wait_for(
                lambda: two.rules.active is not None and "vip-desk" in two.rules.active.queues
            )


async def wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_a_bad_file_is_reported_once_and_its_errors_clear_when_it_is_reverted(
    runtime: Runtime,
    settings: Settings,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bad rules.yaml left in place was logged and written every 2 s (about 1,800 lines an
    hour); reverting it to the active content left the old errors in GET /api/admin/rules."""
    good = settings.rules_path.read_text()
    settings.rules_path.write_text(good.replace("queue: billing, priority: high", "queue: x"))
    with caplog.at_level(logging.INFO, logger="router.rules_service"):
        first = await runtime.rules.import_file()
        assert first is not None and first.errors
        for _ in range(5):  # the watch looking again and again
            assert await runtime.rules.import_file() is None
    rejected = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 1
    token = await admin_token(runtime)
    status = (await client.get("/api/admin/rules", headers=auth(token))).json()
    assert status["last_load"]["errors"] and status["processes"][0]["last_error"]

    settings.rules_path.write_text(good)  # reverted: the content that is active
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="router.rules_service"):
        assert await runtime.rules.import_file() is None
    assert any("matches the last imported ruleset" in r.getMessage() for r in caplog.records)
    status = (await client.get("/api/admin/rules", headers=auth(token))).json()
    assert status["last_load"]["errors"] == []
    assert status["processes"][0]["last_error"] is None
    # the same bad content again is reported again (it is news after the revert)
    settings.rules_path.write_text(good.replace("queue: billing, priority: high", "queue: x"))
    again = await runtime.rules.import_file()
    assert again is not None and again.errors
