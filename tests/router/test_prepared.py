"""Prepared statements (``router.db.prepared``): on SQLite the writer runs them on the driver;
what they store and return must be exactly what SQLAlchemy stores and returns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.exc import MultipleResultsFound, NoResultFound, StatementError

from router.agents import create_agent, parse_capacity
from router.auth import create_user
from router.db import _PLANS, _SAVEPOINT_SQL, Tx, any_of, prepared
from router.models import Agent, Offer, StreamEvent, table
from router.runtime import Runtime
from router.types import OfferState

_events = table(StreamEvent)
_NEW_EVENT = prepared(insert(_events).returning(_events.c.id))
_EVENT = prepared(
    select(_events.c.id, _events.c.payload, _events.c.at).where(_events.c.id == bindparam("id"))
)
_EVENTS_AFTER = prepared(
    select(_events.c.id).where(_events.c.id > bindparam("id")).order_by(_events.c.id)
)
# a constant in the statement (the state) besides the given parameters
_PENDING_OF = prepared(
    select(Offer.id).where(
        Offer.agent_id == bindparam("agent"), Offer.state == OfferState.PENDING.value
    )
)
_RENAME = prepared(
    update(Agent).where(Agent.id == bindparam("agent")).values(display_name=bindparam("name"))
)
_NAME_OF = prepared(select(Agent.display_name).where(Agent.id == bindparam("agent")))
_SAME_NOT_PREPARED = select(_events.c.id, _events.c.payload, _events.c.at).where(
    _events.c.id == bindparam("id")
)
# ids bound as one value: the same SQL for any number of them
_ANY = prepared(select(_events.c.id).where(any_of(_events.c.id, "ids")).order_by(_events.c.id))
# an expanding IN cannot be compiled once: it runs through SQLAlchemy
_SOME = prepared(select(_events.c.id).where(_events.c.id.in_(bindparam("ids", expanding=True))))


def _new_events(tx: Tx, stream: str, count: int) -> list[int]:
    """``count`` stream events stored through the prepared insert; their ids in order."""
    return [
        tx.execute(
            _NEW_EVENT, {"stream": stream, "seq": n, "at": tx.now, "type": "t", "payload": {}}
        ).scalar_one()
        for n in range(count)
    ]


async def _agent(runtime: Runtime) -> int:
    def add(tx: Tx) -> int:
        user_id, _ = create_user(tx, "anna", "agent")
        return create_agent(tx, user_id, "Anna", {}, parse_capacity("webchat=2"))

    return int(await runtime.db.write(add))


async def test_rows_read_back_exactly_as_through_sqlalchemy(runtime: Runtime) -> None:
    at = datetime(2026, 11, 26, 8, 30, 15, 123456, tzinfo=UTC)
    facts: dict[str, Any] = {"message": {"text": "Grüße"}, "n": 3, "ok": True, "none": None}

    def store(tx: Tx) -> tuple[Any, Any, Any]:
        params = {"stream": "test", "seq": 1, "at": at, "type": "t", "payload": facts}
        new_id = tx.execute(_NEW_EVENT, params).scalar_one()
        fast = tx.execute(_EVENT, {"id": new_id}).one()
        slow = tx.conn.execute(_SAME_NOT_PREPARED, {"id": new_id}).one()
        return new_id, fast, slow

    new_id, fast, slow = await runtime.db.write(store)
    assert tuple(fast) == tuple(slow) == (new_id, facts, at)
    assert fast.at.tzinfo is not None and fast.payload["message"]["text"] == "Grüße"
    assert fast._mapping == {"id": new_id, "payload": facts, "at": at}
    # stored alike: SQLAlchemy reads what the driver wrote
    assert await runtime.db.read(lambda c: c.execute(_EVENT, {"id": new_id}).one()) == fast
    if runtime.db.dialect == "sqlite":  # and it was the driver's path
        assert any(key[0] == id(_EVENT) and plan is not None for key, plan in _PLANS.items())


async def test_results_answer_like_sqlalchemys(runtime: Runtime) -> None:
    agent_id = await _agent(runtime)

    def probe(tx: Tx) -> dict[str, Any]:
        ids = _new_events(tx, "t", 3)
        out: dict[str, Any] = {"ids": ids}
        out["after"] = [r.id for r in tx.execute(_EVENTS_AFTER, {"id": ids[0]})]
        out["all"] = [tuple(r) for r in tx.execute(_EVENTS_AFTER, {"id": ids[1]}).all()]
        out["first"] = tx.execute(_EVENTS_AFTER, {"id": ids[0]}).first().id
        out["none"] = tx.execute(_EVENTS_AFTER, {"id": ids[2]}).first()
        out["scalar"] = tx.execute(_EVENTS_AFTER, {"id": ids[2]}).scalar()
        out["one_or_none"] = tx.execute(_EVENTS_AFTER, {"id": ids[2]}).scalar_one_or_none()
        with pytest.raises(MultipleResultsFound):
            tx.execute(_EVENTS_AFTER, {"id": ids[0]}).one()
        with pytest.raises(NoResultFound):
            tx.execute(_EVENTS_AFTER, {"id": ids[2]}).scalar_one()
        out["pending"] = tx.execute(_PENDING_OF, {"agent": agent_id}).all()
        out["renamed"] = tx.execute(_RENAME, {"agent": agent_id, "name": "Anna S."}).rowcount
        out["missing"] = tx.execute(_RENAME, {"agent": agent_id + 99, "name": "x"}).rowcount
        out["some"] = sorted(r.id for r in tx.execute(_SOME, {"ids": ids[:2]}))
        return out

    out = await runtime.db.write(probe)
    ids = out["ids"]
    assert out["after"] == ids[1:] and out["all"] == [(ids[2],)] and out["first"] == ids[1]
    assert out["none"] is None and out["scalar"] is None and out["one_or_none"] is None
    assert out["pending"] == [] and out["renamed"] == 1 and out["missing"] == 0
    assert out["some"] == ids[:2]
    name = await runtime.db.read(
        lambda c: c.execute(select(Agent.display_name).where(Agent.id == agent_id)).scalar_one()
    )
    assert name == "Anna S."


async def test_a_prepared_write_rolls_back_with_its_savepoint(runtime: Runtime) -> None:
    agent_id = await _agent(runtime)

    def fail(tx: Tx) -> None:
        tx.execute(_RENAME, {"agent": agent_id, "name": "half done"})
        raise RuntimeError("after the update")

    with pytest.raises(RuntimeError):
        await runtime.db.write(fail)
    name = await runtime.db.read(
        lambda c: c.execute(select(Agent.display_name).where(Agent.id == agent_id)).scalar_one()
    )
    assert name == "Anna"


async def test_nested_savepoints_roll_back_alone_and_reuse_their_names(runtime: Runtime) -> None:
    """Savepoints are named by depth (the driver keeps their statements): siblings reuse a
    name, a failed inner one undoes only its own writes and buffered stream events, and the
    depth is right again after a failure."""
    agent_id = await _agent(runtime)

    def nest(tx: Tx) -> list[str]:
        seen = []
        for n in range(50):  # siblings at the same depth
            with tx.savepoint():
                tx.execute(_RENAME, {"agent": agent_id, "name": f"outer {n}"})
                try:
                    with tx.savepoint():
                        tx.execute(_RENAME, {"agent": agent_id, "name": f"inner {n}"})
                        tx.emit("test:nested", "dropped", {"n": n})
                        raise LookupError
                except LookupError:
                    pass
                seen.append(tx.execute(_NAME_OF, {"agent": agent_id}).scalar_one())
        tx.emit("test:nested", "kept", {})
        return seen

    seen = await runtime.db.write(nest)
    assert seen == [f"outer {n}" for n in range(50)]
    events = await runtime.db.stream_events("test:nested", 0)
    assert [e.type for e in events] == ["kept"]
    name = await runtime.db.read(lambda c: c.execute(_NAME_OF, {"agent": agent_id}).scalar_one())
    assert name == "outer 49"
    if runtime.db.dialect == "sqlite":  # a few names in all, not one per savepoint
        assert len(_SAVEPOINT_SQL) < 10


async def test_datetimes_are_stored_as_sqlalchemy_stores_them(runtime: Runtime) -> None:
    """The prepared path's own datetime binding writes the same text (SQLite) or value
    (PostgreSQL) as SQLAlchemy's processors, from any time zone; a naive one is refused."""
    eastern = timezone(timedelta(hours=-5))
    moments = [
        datetime(2026, 11, 26, 8, 30, 15, 123456, tzinfo=UTC),
        datetime(2026, 1, 1, tzinfo=UTC),  # no microseconds: still written out
        datetime(2026, 3, 3, 22, 2, 3, 7, tzinfo=eastern),  # the next day in UTC
    ]
    # the binding remembers the last datetime it wrote: the same object again, then the same
    # instant as another object in another zone, then a different one
    moments += [moments[0], moments[0].astimezone(eastern), moments[1]]

    def store(tx: Tx) -> list[tuple[int, int]]:
        pairs = []
        for n, at in enumerate(moments):
            params = {"stream": "dt", "seq": 2 * n, "at": at, "type": "t", "payload": {}}
            fast = tx.execute(_NEW_EVENT, params).scalar_one()
            params = {**params, "seq": 2 * n + 1}
            slow = tx.conn.execute(insert(_events).returning(_events.c.id), params).scalar_one()
            pairs.append((fast, slow))
        return pairs

    def naive(tx: Tx) -> None:
        params = {"stream": "dt", "seq": 99, "at": datetime(2026, 1, 1), "type": "t"}
        tx.execute(_NEW_EVENT, {**params, "payload": {}})

    pairs = await runtime.db.write(store)
    with pytest.raises((ValueError, StatementError), match="naive"):
        await runtime.db.write(naive)

    def stored(conn: Any) -> list[tuple[Any, Any]]:
        raw = text("SELECT at FROM stream_events WHERE id = :id")
        return [
            (conn.execute(raw, {"id": a}).scalar_one(), conn.execute(raw, {"id": b}).scalar_one())
            for a, b in pairs
        ]

    for (fast, slow), at in zip(await runtime.db.read(stored), moments, strict=True):
        assert fast == slow
        if runtime.db.dialect == "sqlite":
            assert fast == at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


async def test_any_of_binds_its_ids_as_one_value(runtime: Runtime) -> None:
    def probe(tx: Tx) -> dict[str, Any]:
        ids = _new_events(tx, "any", 4)
        return {
            "ids": ids,
            "some": [r.id for r in tx.execute(_ANY, {"ids": [ids[3], ids[1], 10**9]})],
            "none": tx.execute(_ANY, {"ids": []}).all(),
            "all": [r.id for r in tx.execute(_ANY, {"ids": ids})],
        }

    out = await runtime.db.write(probe)
    ids = out["ids"]
    assert out["some"] == [ids[1], ids[3]] and out["none"] == [] and out["all"] == ids
    # and through SQLAlchemy (a reader) alike
    read = await runtime.db.read(lambda c: [r.id for r in c.execute(_ANY, {"ids": ids[:2]})])
    assert read == ids[:2]
    if runtime.db.dialect == "sqlite":  # one plan, on the driver's path
        plans = [plan for key, plan in _PLANS.items() if key[0] == id(_ANY)]
        assert len(plans) == 1 and plans[0] is not None
