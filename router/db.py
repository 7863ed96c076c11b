"""Database access: one way to write, one way to read, on SQLite and PostgreSQL alike.

Domain code is written as plain functions over a SQLAlchemy ``Connection``:

    def accept(tx: Tx, offer_id: int) -> int: ...
    await db.write(accept, offer_id)

``write`` runs the function in its own transaction and returns after the commit; stream
events the function emitted get their per-stream sequence numbers inside that same
transaction and are published on the bus only after the commit.

**SQLite**: all writes go through one writer thread holding the only write connection
(``BEGIN IMMEDIATE``, WAL, ``synchronous=FULL`` by default). Writes that arrive while a
commit is in progress are committed together in the next transaction (group commit), each
inside its own SAVEPOINT so one failing write never affects the others, and no caller is
answered before its commit. Reads run on a small thread pool of separate connections.
(aiosqlite was measured at 13x the cost per multi-statement write because every statement
hops threads; the sync driver in a dedicated thread avoids that.)

**PostgreSQL**: SQLAlchemy's asyncio engine on asyncpg; each write is a pooled transaction,
retried on deadlock or serialization failure. Concurrency control is by conditional updates
and ``FOR UPDATE SKIP LOCKED``, never by in-process locks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import random
import threading
import time
from collections import defaultdict, namedtuple
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    Connection,
    Engine,
    Text,
    TypeDecorator,
    bindparam,
    create_engine,
    event,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.visitors import InternalTraversal

from adapters.clock import Clock, SystemClock
from router.exceptions import DatabaseUnavailable
from router.models import EventStream, StreamEvent, UTCDateTime, table

__all__ = [
    "Database",
    "StreamRecord",
    "Tx",
    "insert_ignore",
    "is_retryable",
    "prepared",
    "prepared_each",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
_streams = table(EventStream)
_BUMP_STREAM = (
    update(_streams)
    .where(_streams.c.stream == bindparam("s"))
    .values(last_seq=_streams.c.last_seq + bindparam("n"))
    .returning(_streams.c.last_seq)
)
_INSERT_STREAM_EVENT = insert(table(StreamEvent))
_stream_events = table(StreamEvent)
_BUMPED = (
    update(_streams)
    .where(_streams.c.stream == bindparam("s"))
    .values(last_seq=_streams.c.last_seq + 1)
    .returning(_streams.c.last_seq)
    .cte("bumped")
)
# PostgreSQL: number and store one event in one round trip (nothing when the stream has no
# row yet: the caller creates it and takes the general path).
_APPEND_ONE = (
    insert(_stream_events)
    .from_select(
        ["stream", "seq", "at", "type", "payload"],
        select(
            bindparam("s", type_=_streams.c.stream.type),
            _BUMPED.c.last_seq,
            bindparam("at", type_=_stream_events.c.at.type),
            bindparam("type", type_=_stream_events.c.type.type),
            bindparam("payload", type_=_stream_events.c.payload.type),
        ).select_from(_BUMPED),
    )
    .returning(_stream_events.c.seq)
)
MAX_BATCH = 256
# A batch that takes longer is logged: every write queued behind it waited that long.
SLOW_BATCH_SECONDS = 1.0
_STOP = object()


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """A committed stream event, as published on the bus and sent to sockets."""

    stream: str
    seq: int
    type: str
    at: datetime
    payload: dict[str, Any]

    def frame(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "seq": self.seq,
            "type": self.type,
            "at": self.at.isoformat(),
            **self.payload,
        }


class Tx:
    """One write transaction: the connection, the clock reading, buffered stream events
    and callbacks to run after the commit."""

    __slots__ = (
        "_after",
        "_batch_end",
        "_events",
        "_raw",
        "conn",
        "context",
        "dialect",
        "now",
        "records",
    )

    def __init__(
        self,
        conn: Connection,
        now: datetime,
        dialect: str,
        context: dict[str, Any] | None = None,
    ) -> None:
        self.conn = conn
        self.now = now
        self.dialect = dialect
        self.context = context if context is not None else {}  # the owner's (Database.context)
        self._events: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        self._after: list[Callable[[], Any]] = []
        self.records: list[StreamRecord] = []
        # SQLite's own connection, for the statements that need nothing from SQLAlchemy
        # (append-only inserts, savepoints): the same connection and transaction, at a
        # fraction of the cost per statement (bench/e2e.py runs about 14 per message).
        self._raw: Any = conn.connection.driver_connection if dialect == "sqlite" else None
        self._batch_end: list[tuple[Callable[[Tx], Any], list[Any]]] = []

    def emit(self, stream: str, type_: str, payload: dict[str, Any]) -> None:
        """Append an event to ``stream`` (sequence assigned at the end of the transaction)."""
        self._events[stream].append((type_, payload))

    def on_commit(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` (sync, or returning an awaitable) on the event loop after the commit."""
        self._after.append(fn)

    def execute(self, statement: Any, params: Any = None) -> Any:
        """``statement`` in this transaction. A statement marked with :func:`prepared` runs
        straight on SQLite's driver (the writer's hot path); anything else, and every
        statement on PostgreSQL, through SQLAlchemy."""
        if self._raw is not None and id(statement) in _PREPARED:
            given = params if params is not None else {}
            if type(given) is dict:
                plan = _plan(statement, self.conn.dialect, given)
                if plan is not None:
                    return plan.run(self._raw, given)
        return self.conn.execute(statement, params)

    def at_batch_end(self, fn: Callable[[Tx], Any], done: list[Any]) -> None:
        """Run ``fn(tx)`` after this transaction's own work, in a savepoint, and append its
        result to ``done``. Jobs committed together (SQLite's group commit) that ask for
        the same ``fn`` get one run of it, after all of them: work cheaper done once for
        many, such as routing what their messages created. A failure is logged and rolled
        back alone (``done`` stays empty): the jobs' own work still commits."""
        self._batch_end.append((fn, done))

    def append(self, statement: Any, params: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Execute an INSERT whose result nobody reads (an append-only log row), with one
        parameter dict or a list of them."""
        rows = params if isinstance(params, list) else [params]
        if self._raw is None or not rows or id(statement) not in _PREPARED:
            self.conn.execute(statement, params)
            return
        plan = _plan(statement, self.conn.dialect, rows[0])
        if plan is None:  # the statement needs SQLAlchemy (defaults filled in, say)
            self.conn.execute(statement, params)
            return
        if len(rows) == 1:
            self._raw.execute(plan.sql, plan.values(rows[0]))
        else:
            self._raw.executemany(plan.sql, [plan.values(r) for r in rows])

    def savepoint(self) -> _Savepoint:
        """A nested transaction: on an exception, its statements *and* the stream events and
        after-commit callbacks it buffered are rolled back; the exception propagates."""
        return _Savepoint(self.conn, self._raw, self)

    def flush_streams(self) -> None:
        """Number and store the buffered stream events. Streams are locked in sorted order,
        late in the transaction, so row locks are held briefly and never deadlock."""
        for stream in sorted(self._events):
            events = self._events[stream]
            n = len(events)
            if n == 1 and self.dialect == "postgresql":
                type_, payload = events[0]
                params = {"s": stream, "at": self.now, "type": type_, "payload": payload}
                seq = self.conn.execute(_APPEND_ONE, params).scalar()
                if seq is None:  # the stream's first event
                    insert_ignore(self.conn, EventStream, {"stream": stream, "last_seq": 0})
                    seq = self.conn.execute(_APPEND_ONE, params).scalar_one()
                self.records.append(StreamRecord(stream, seq, type_, self.now, payload))
                continue
            last = self.execute(_BUMP_STREAM, {"s": stream, "n": n}).scalar()
            if last is None:
                insert_ignore(self.conn, EventStream, {"stream": stream, "last_seq": 0})
                last = self.execute(_BUMP_STREAM, {"s": stream, "n": n}).scalar_one()
            first = last - n + 1
            records = [
                StreamRecord(stream, first + i, t, self.now, p) for i, (t, p) in enumerate(events)
            ]
            self.append(
                _INSERT_STREAM_EVENT,
                [
                    {
                        "stream": r.stream,
                        "seq": r.seq,
                        "at": r.at,
                        "type": r.type,
                        "payload": r.payload,
                    }
                    for r in records
                ],
            )
            self.records.extend(records)
        self._events.clear()


# -- prepared statements: the writer's hot path on SQLite ----------------------------------
# SQLAlchemy spends several times SQLite's own work on each statement it runs (parameters
# checked and processed, a cache key, a result object): at the dozen statements a new web
# chat costs, that was most of the writer's time. A statement built once at import and
# marked ``prepared`` is compiled once per set of parameter names, then runs on the driver
# with SQLAlchemy's own bind and result processors, so values are stored and read back
# exactly as SQLAlchemy would.
_PREPARED: dict[int, Any] = {}  # id -> the statement, held so that its id is never reused
_PLANS: dict[tuple[int, frozenset[str]], _Plan | None] = {}
S = TypeVar("S")
K = TypeVar("K")


def prepared(statement: S) -> S:
    """Mark a module-level statement for the fast path of ``Tx.execute`` and ``Tx.append``.
    Only for statements built once: every marked statement is compiled and kept."""
    _PREPARED[id(statement)] = statement
    return statement


def prepared_each(statements: dict[K, S]) -> dict[K, S]:
    """:func:`prepared` for each statement of a table of variants."""
    for statement in statements.values():
        prepared(statement)
    return statements


class _IdList(TypeDecorator[list[int]]):
    """A list of ids bound as one value: JSON text on SQLite (read with ``json_each``), an
    array on PostgreSQL."""

    impl = Text
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(postgresql.ARRAY(BigInteger))
        return dialect.type_descriptor(Text())

    def process_bind_param(self, value: Any, dialect: Any) -> Any:
        ids = [int(v) for v in value]
        return ids if dialect.name == "postgresql" else json.dumps(ids)


class any_of(ColumnElement[bool]):
    """``column IN (the ids given as parameter name)``. Unlike an expanding ``IN`` its SQL
    does not depend on how many ids there are, so a statement using it can be prepared."""

    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True  # a condition as it is: no "= 1" after it on SQLite
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("ids", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: Any, name: str) -> None:
        self.column = column
        self.ids = bindparam(name, type_=_IdList())


@compiles(any_of, "sqlite")
def _any_of_sqlite(element: any_of, compiler: Any, **kw: Any) -> str:
    column, ids = compiler.process(element.column, **kw), compiler.process(element.ids, **kw)
    return f"{column} IN (SELECT value FROM json_each({ids}))"


@compiles(any_of)
def _any_of_array(element: any_of, compiler: Any, **kw: Any) -> str:
    column, ids = compiler.process(element.column, **kw), compiler.process(element.ids, **kw)
    return f"{column} = ANY({ids})"


# the stream statements above (SQLite numbers and stores a commit's events with them)
prepared(_BUMP_STREAM)
prepared(_INSERT_STREAM_EVENT)


class _Rows:
    """The result of a prepared statement: the parts of SQLAlchemy's ``Result`` the callers
    use, over rows read at once."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def all(self) -> list[Any]:
        return self.rows

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def one_or_none(self) -> Any:
        if len(self.rows) > 1:
            raise MultipleResultsFound("multiple rows were found when one or none was required")
        return self.rows[0] if self.rows else None

    def one(self) -> Any:
        row = self.one_or_none()
        if row is None:
            raise NoResultFound("no row was found when one was required")
        return row

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalar_one_or_none(self) -> Any:
        row = self.one_or_none()
        return row[0] if row is not None else None


class _Plan:
    """One prepared statement compiled for one set of parameter names. Its parameter tuple
    and its rows are built by functions generated for it (:func:`_generate`): a generic loop
    over the binds and columns cost about as much as SQLite's own work on a short insert."""

    __slots__ = ("make_row", "sql", "values")

    def __init__(
        self,
        sql: str,
        binds: list[tuple[str | None, Any, Any]],
        row: Any,
        processors: list[Any] | None,
    ) -> None:
        # binds: (parameter name or None for a constant, bind processor, constant) each;
        # row: a named-tuple class, or None when the statement returns no rows
        self.sql = sql
        self.values: Callable[[dict[str, Any]], tuple[Any, ...]] = _generate(
            "params",
            [
                f"k{i}" if name is None else f"f{i}(params[{name!r}])" if p else f"params[{name!r}]"
                for i, (name, p, _) in enumerate(binds)
            ],
            {
                **{f"f{i}": p for i, (name, p, _) in enumerate(binds) if name is not None and p},
                **{f"k{i}": c for i, (name, _, c) in enumerate(binds) if name is None},
            },
        )
        self.make_row: Callable[[tuple[Any, ...]], Any] | None = None
        if row is not None:
            count = len(row._fields)
            procs = processors or [None] * count
            self.make_row = _generate(
                "r",
                [f"f{i}(r[{i}])" if procs[i] else f"r[{i}]" for i in range(count)],
                {f"f{i}": p for i, p in enumerate(procs) if p},
                make=row,
            )

    def run(self, raw: Any, params: dict[str, Any]) -> _Rows:
        cursor = raw.execute(self.sql, self.values(params))
        if self.make_row is None:
            return _Rows([], cursor.rowcount)
        return _Rows(list(map(self.make_row, cursor.fetchall())), cursor.rowcount)


def _generate(arg: str, items: list[str], names: dict[str, Any], make: Any = None) -> Any:
    """``lambda arg: (item, ...)`` (or ``make(item, ...)``) compiled from trusted pieces:
    parameter names (through ``repr``), column positions and generated local names."""
    body = ", ".join(items)
    if make is not None:
        source = f"lambda {arg}: make({body})"
    else:  # a tuple, even of one item or of none
        source = f"lambda {arg}: ({body}{',' if items else ''})"
    return eval(source, {"__builtins__": {}, "make": make, **names})


def _plan(statement: Any, dialect: Any, params: dict[str, Any]) -> _Plan | None:
    key = (id(statement), frozenset(params))
    try:
        return _PLANS[key]
    except KeyError:
        pass
    plan = _compile_plan(statement, dialect, params)
    if plan is None:  # once per statement and parameter names: it works, only slower
        log.info("a prepared statement runs through SQLAlchemy: %s", str(statement)[:200])
    _PLANS[key] = plan
    return plan


def _compile_plan(statement: Any, dialect: Any, params: dict[str, Any]) -> _Plan | None:
    """None when the statement needs SQLAlchemy at run time: a Python-side column default
    to fill in, an expanding ``IN``, a parameter that was not given, a result column whose
    name cannot be an attribute."""
    compiled = statement.compile(dialect=dialect, column_keys=list(params))
    if (
        "POSTCOMPILE" in compiled.string
        or compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.positiontup is None
    ):
        return None
    processors = compiled._bind_processors
    binds: list[tuple[str | None, Any, Any]] = []
    for name in compiled.positiontup:
        bind = compiled.binds.get(name)
        if name in params:
            fast = bind is not None and isinstance(bind.type, UTCDateTime)
            binds.append((name, _utc_text if fast else processors.get(name), None))
            continue
        if bind is None or bind.callable is not None or bind.required:
            return None
        process = processors.get(name)
        binds.append((None, None, process(bind.value) if process else bind.value))
    row = None
    column_processors: list[Any] | None = None
    if compiled._result_columns:
        names = [entry[0] for entry in compiled._result_columns]
        if len(set(names)) != len(names) or not all(
            n.isidentifier() and not n.startswith("_") for n in names
        ):
            return None
        row = _row_class(tuple(names))
        column_processors = [
            entry[3]._cached_result_processor(dialect, None) for entry in compiled._result_columns
        ]
        if not any(column_processors):
            column_processors = None
    return _Plan(compiled.string, binds, row, column_processors)


_UTC_LAST: tuple[datetime | None, str | None] = (None, None)


def _utc_text(value: datetime | None) -> str | None:
    """What SQLAlchemy stores for a ``UTCDateTime`` on SQLite (naive UTC text with
    microseconds, its ``DATETIME`` format), in one step instead of its two processors."""
    global _UTC_LAST
    if value is None:
        return None
    last = _UTC_LAST  # one tuple, read once: another thread may replace it meanwhile
    if value is last[0]:  # a transaction stores its clock reading many times
        return last[1]
    if value.tzinfo is None:
        raise ValueError("naive datetime stored; use the injected clock")
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    text = utc.isoformat(" ", "microseconds")[:26]
    _UTC_LAST = (value, text)
    return text


_ROW_CLASSES: dict[tuple[str, ...], Any] = {}


def _row_class(names: tuple[str, ...]) -> Any:
    """A named tuple per column list: rows read by attribute, index or unpacking, like
    SQLAlchemy's, and ``_mapping`` for the rare caller that wants a dict."""
    if names not in _ROW_CLASSES:
        base = namedtuple("Row", list(names))  # type: ignore[misc]

        class Row(base):
            __slots__ = ()

            @property
            def _mapping(self) -> dict[str, Any]:
                return dict(zip(self._fields, self, strict=True))

        _ROW_CLASSES[names] = Row
    return _ROW_CLASSES[names]


class _Savepoint:
    """SAVEPOINT ... RELEASE, or ROLLBACK TO on an exception (which propagates); with a
    ``tx``, its buffered stream events and after-commit callbacks are rolled back too. On
    SQLite straight on its connection (SQLAlchemy's own costs several statements' worth),
    named by nesting depth so that the driver's statement cache keeps the three statements."""

    __slots__ = ("_after_mark", "_depth", "_events_mark", "_nested", "conn", "raw", "tx")

    def __init__(self, conn: Connection, raw: Any, tx: Tx | None = None) -> None:
        self.conn = conn
        self.raw = raw
        self.tx = tx

    def __enter__(self) -> None:
        tx = self.tx
        if tx is not None:
            self._events_mark = {stream: len(items) for stream, items in tx._events.items()}
            self._after_mark = len(tx._after)
        if self.raw is None:
            self._nested = self.conn.begin_nested()
            return
        depth = self._depth = _SAVEPOINT_DEPTH.get(id(self.raw), 0)
        _SAVEPOINT_DEPTH[id(self.raw)] = depth + 1
        self.raw.execute(_savepoint_sql(depth)[0])

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if self.raw is None:
            if kind is None:
                self._nested.commit()
            else:
                self._nested.rollback()
        else:
            _SAVEPOINT_DEPTH[id(self.raw)] = self._depth
            _, rollback, release = _savepoint_sql(self._depth)
            if kind is not None:
                self.raw.execute(rollback)
            self.raw.execute(release)
        tx = self.tx
        if kind is not None and tx is not None:
            marks = self._events_mark
            for stream in list(tx._events):
                if stream in marks:
                    del tx._events[stream][marks[stream] :]
                else:
                    del tx._events[stream]
            del tx._after[self._after_mark :]


# the savepoints open on each SQLite connection (by id: a driver connection takes no
# attributes); only the writer's thread uses its connection
_SAVEPOINT_DEPTH: dict[int, int] = {}
_SAVEPOINT_SQL: list[tuple[str, str, str]] = []


def _savepoint_sql(depth: int) -> tuple[str, str, str]:
    while len(_SAVEPOINT_SQL) <= depth:
        name = f"omniroute_sp_{len(_SAVEPOINT_SQL)}"
        _SAVEPOINT_SQL.append(
            (f"SAVEPOINT {name}", f"ROLLBACK TO SAVEPOINT {name}", f"RELEASE SAVEPOINT {name}")
        )
    return _SAVEPOINT_SQL[depth]


def _run_batch_end(conn: Connection, now: datetime, txs: list[Tx]) -> None:
    """The ``at_batch_end`` work of ``txs`` (one run per distinct function), each in a
    savepoint; what it emits is published after the commit with the last asking job."""
    wanted: dict[Callable[[Tx], Any], tuple[Tx, list[list[Any]]]] = {}
    for tx in txs:
        for fn, done in tx._batch_end:
            dones = wanted[fn][1] if fn in wanted else []
            dones.append(done)
            wanted[fn] = (tx, dones)  # the owner: the last job asking for it
        tx._batch_end.clear()
    for fn, (owner, dones) in wanted.items():
        etx = Tx(conn, now, owner.dialect, owner.context)
        try:
            with _Savepoint(conn, etx._raw):
                result = fn(etx)
                etx.flush_streams()
        except Exception:
            log.exception("batch-end work %r failed; left to the next trigger", fn)
            continue
        for done in dones:
            done.append(result)
        owner.records.extend(etx.records)
        owner._after.extend(etx._after)


def insert_ignore(conn: Connection, model: Any, values: dict[str, Any]) -> int:
    """``INSERT ... ON CONFLICT DO NOTHING`` on either backend; returns rows inserted."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        stmt: Any = pg_insert(model).values(**values).on_conflict_do_nothing()
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        stmt = sqlite_insert(model).values(**values).on_conflict_do_nothing()
    return int(conn.execute(stmt).rowcount or 0)


@dataclass
class _Job:
    fn: Callable[..., Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    args: tuple[Any, ...] = field(default_factory=tuple)
    kwargs: dict[str, Any] = field(default_factory=dict)


def is_retryable(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "sqlstate", None) or getattr(
        getattr(exc.orig, "__cause__", None), "sqlstate", None
    )
    return code in ("40001", "40P01")  # serialization failure, deadlock


# SQLSTATE classes that are the database's trouble, not a statement's: connection
# exceptions, insufficient resources, operator intervention (a shutdown), system errors.
_TROUBLE_CLASSES = ("08", "53", "57", "58")


def database_trouble(exc: BaseException) -> bool:
    """Whether ``exc`` says the database (its connection, its storage, its shutdown) failed,
    rather than the statement: such a failure is retried, never blamed on the input."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError | TimeoutError | DatabaseUnavailable):
            return True
        code = getattr(current, "sqlstate", None)
        if isinstance(code, str) and code.startswith(_TROUBLE_CLASSES):
            return True
        if type(current).__module__.startswith("asyncpg") and type(current).__name__ in (
            "InterfaceError",
            "ConnectionDoesNotExistError",
            "ConnectionFailureError",
            "InternalClientError",
        ):
            return True
        if storage_failure(current) is not None:
            return True
        current = getattr(current, "orig", None) or current.__cause__
    return False


class Database:
    """Async facade over SQLite (writer thread + reader pool) or PostgreSQL (asyncpg)."""

    def __init__(
        self,
        url: str,
        *,
        clock: Clock | None = None,
        sqlite_synchronous: str = "FULL",
        pool_size: int = 10,
        max_overflow: int = 10,
        on_records: Callable[[list[StreamRecord]], Awaitable[None] | None] | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.url = make_url(url)
        self.clock = clock or SystemClock()
        # What every transaction may consult (Tx.context), e.g. the active ruleset's provider.
        self.context: dict[str, Any] = {}
        self.dialect = self.url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite or postgresql")
        self.sqlite_synchronous = sqlite_synchronous.upper()
        self.on_records = on_records
        # SQLite: called from the writer thread after each committed batch with the number
        # of writes and the seconds it took (metrics)
        self.on_batch = on_batch
        self._pool_size, self._max_overflow = pool_size, max_overflow
        self._async_engine: AsyncEngine | None = None
        self._writer_engine: Engine | None = None
        self._reader_engine: Engine | None = None
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._checkpoints: threading.Thread | None = None
        self._checkpoint_stop = threading.Event()
        self.commits = 0  # transactions committed (SQLite: batches)
        self.writes = 0  # write functions committed
        # The last write the storage refused (disk full, read-only, I/O error): when, in
        # monotonic seconds, and why. /readyz is not ready for a while after one.
        self.write_failed: tuple[float, str] | None = None

    # -- life cycle ---------------------------------------------------------------------
    @property
    def sqlite_path(self) -> str | None:
        return self.url.database if self.dialect == "sqlite" else None

    def sync_url(self) -> str:
        if self.dialect == "sqlite":
            return self.url.set(drivername="sqlite").render_as_string(hide_password=False)
        return self.url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)

    async def start(self) -> None:
        if self.dialect == "sqlite":
            self._writer_engine = self._sqlite_engine(write=True)
            self._reader_engine = self._sqlite_engine(write=False)
            self._readers = ThreadPoolExecutor(4, thread_name_prefix="omniroute-db-read")
            self._writer = threading.Thread(
                target=self._writer_main, name="omniroute-db-writer", daemon=True
            )
            self._writer.start()
            self._checkpoint_stop = threading.Event()
            self._checkpoints = threading.Thread(
                target=self._checkpointer, name="omniroute-db-checkpoint", daemon=True
            )
            self._checkpoints.start()
        else:
            self._async_engine = create_async_engine(
                self.url.set(drivername="postgresql+asyncpg"),
                pool_size=self._pool_size,
                max_overflow=self._max_overflow,
                # No ping per checkout (a round trip on every transaction): a connection the
                # server dropped fails its first statement, and that transaction is retried
                # on a fresh connection (below), since nothing of it was committed.
            )

    def _checkpointer(self) -> None:
        """Copy the WAL back into the database file from a connection of its own, so the
        writer's commits never pay for a checkpoint (a PASSIVE checkpoint does not block it)."""
        import sqlite3

        assert self.sqlite_path is not None
        conn = sqlite3.connect(
            self.sqlite_path, timeout=30, isolation_level=None, check_same_thread=False
        )
        try:
            while not self._checkpoint_stop.wait(1.0):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    log.debug("passive checkpoint failed; retrying in a second", exc_info=True)
        finally:
            conn.close()

    async def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoint_stop.set()
            await asyncio.get_running_loop().run_in_executor(None, self._checkpoints.join)
            self._checkpoints = None
        if self._writer is not None:
            self._jobs.put(_STOP)
            await asyncio.get_running_loop().run_in_executor(None, self._writer.join)
            self._writer = None
        if self._readers is not None:
            self._readers.shutdown(wait=True)
            self._readers = None
        for engine in (self._writer_engine, self._reader_engine):
            if engine is not None:
                engine.dispose()
        self._writer_engine = self._reader_engine = None
        if self._async_engine is not None:
            await self._async_engine.dispose()
            self._async_engine = None

    def _sqlite_engine(self, *, write: bool) -> Engine:
        engine = create_engine(
            self.url.set(drivername="sqlite"),
            poolclass=NullPool if write else None,
            connect_args={"check_same_thread": False, "timeout": 30},
            **({} if write else {"pool_size": 4, "max_overflow": 4}),
        )
        synchronous = self.sqlite_synchronous

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy (not the driver) issue BEGIN, so SAVEPOINTs work and the
            # writer can take the write lock up front with BEGIN IMMEDIATE.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            # The busy timeout first: right after a crash the first connection recovers the
            # WAL and others must wait for it, not fail with "database is locked".
            cur.execute("PRAGMA busy_timeout=30000")
            if write:  # WAL is a property of the file, set once by the writer
                cur.execute("PRAGMA journal_mode=WAL")
                # Checkpoints run beside the writer (see _checkpointer), never inside a commit.
                cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        return engine

    # -- writes -------------------------------------------------------------------------
    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(tx, *args)`` in a write transaction; return its result after the commit
        and after its stream events are published. Shielded: a caller that is cancelled
        (a client hung up) does not stop a commit in flight or the publishing after it."""
        return await asyncio.shield(self._write(fn, args, kwargs))

    async def _write(
        self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        try:
            if self.dialect == "sqlite":
                loop = asyncio.get_running_loop()
                future: asyncio.Future[Any] = loop.create_future()
                self._jobs.put(_Job(fn, loop, future, args, kwargs))
                result, tx = await future
            else:
                result, tx = await self._pg_write(fn, args, kwargs)
        except Exception as exc:
            reason = storage_failure(exc)
            if reason is not None:
                self.write_failed = (time.monotonic(), reason)
                if not isinstance(exc, DBAPIError):  # the driver's own error (prepared path)
                    raise DatabaseUnavailable(f"the database refuses writes: {reason}") from exc
            if isinstance(exc, OSError | TimeoutError):
                raise DatabaseUnavailable(_unreachable(exc)) from exc
            raise
        await self._after_commit(tx)
        return result

    async def _after_commit(self, tx: Tx) -> None:
        if tx.records and self.on_records is not None:
            maybe = self.on_records(tx.records)
            if maybe is not None:
                await maybe
        for fn in tx._after:
            try:
                result = fn()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
            except Exception:
                log.exception("after-commit callback failed")

    async def _pg_write(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, Tx]:
        assert self._async_engine is not None, "Database.start() first"
        for attempt in range(8):
            holder: list[Tx] = []

            def run(sync_conn: Connection, holder: list[Tx] = holder) -> Any:
                tx = Tx(sync_conn, self.clock.now(), "postgresql", self.context)
                holder.append(tx)
                result = fn(tx, *args, **kwargs)
                tx.flush_streams()
                if tx._batch_end:
                    _run_batch_end(sync_conn, tx.now, [tx])
                return result

            try:
                async with self._async_engine.connect() as conn:
                    await conn.begin()
                    try:
                        result = await conn.run_sync(run)
                    except DBAPIError as exc:
                        if exc.connection_invalidated and attempt < 7:
                            continue  # a stale pooled connection, before any commit: retry
                        if _client_state_error(exc) and attempt < 7:
                            # a connection the server terminated can first fail this way
                            # (asyncpg's own state, not a disconnect): drop it and retry
                            await conn.invalidate()
                            continue
                        raise
                    await conn.commit()  # a failure here is not retried: it may have landed
            except DBAPIError as exc:
                if is_retryable(exc) and attempt < 7:
                    # jittered, so two transactions that collided do not collide again in step
                    await asyncio.sleep(random.uniform(0.002, 0.01) * (2**attempt))
                    continue
                raise
            self.commits += 1
            self.writes += 1
            return result, holder[-1]
        raise AssertionError("unreachable")

    def _writer_main(self) -> None:
        assert self._writer_engine is not None
        conn = self._writer_engine.connect()
        try:
            while True:
                first = self._jobs.get()
                if first is _STOP:
                    return
                batch, stop = [first], False
                while len(batch) < MAX_BATCH:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is _STOP:
                        stop = True
                        break
                    batch.append(job)
                self._run_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: Connection, batch: list[_Job]) -> None:
        started = time.perf_counter()
        outcomes: list[tuple[_Job, bool, Any]] = []
        try:
            with conn.begin():
                for job in batch:
                    tx = Tx(conn, self.clock.now(), "sqlite", self.context)
                    try:
                        with _Savepoint(conn, tx._raw):
                            result = job.fn(tx, *job.args, **job.kwargs)
                            tx.flush_streams()
                        outcomes.append((job, True, (result, tx)))
                    except Exception as exc:
                        outcomes.append((job, False, exc))
                asking = [v[1] for _, ok, v in outcomes if ok and v[1]._batch_end]
                if asking:
                    _run_batch_end(conn, self.clock.now(), asking)
        except Exception as exc:  # the COMMIT itself failed: nothing in the batch is stored
            log.exception("SQLite commit failed for a batch of %d writes", len(batch))
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, False, exc)
            return
        self.commits += 1
        self.writes += sum(1 for _, ok, _ in outcomes if ok)
        # The batch is timed and recorded before its callers are answered: whoever was
        # answered sees it in the metrics (and a slow one in the log) already.
        elapsed = time.perf_counter() - started
        if elapsed >= SLOW_BATCH_SECONDS:
            log.warning(
                "SQLite writer: a batch of %d writes took %.2f s; writes queued behind it waited",
                len(batch),
                elapsed,
            )
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), elapsed)
            except Exception:
                log.exception("on_batch callback failed")
        for job, ok, value in outcomes:
            job.loop.call_soon_threadsafe(_settle, job.future, ok, value)

    # -- reads --------------------------------------------------------------------------
    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a read-only transaction (a consistent snapshot)."""
        if self.dialect == "sqlite":
            assert self._readers is not None, "Database.start() first"
            return await asyncio.get_running_loop().run_in_executor(
                self._readers, self._read_sync, fn, args
            )
        assert self._async_engine is not None, "Database.start() first"
        for attempt in range(3):
            try:
                async with self._async_engine.connect() as conn:
                    return await conn.run_sync(lambda c: fn(c, *args))
            except DBAPIError as exc:
                if not (exc.connection_invalidated and attempt < 2):
                    raise  # else a stale pooled connection: retry on a fresh one
            except (OSError, TimeoutError) as exc:
                raise DatabaseUnavailable(_unreachable(exc)) from exc
        raise AssertionError("unreachable")

    def _read_sync(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        assert self._reader_engine is not None
        with self._reader_engine.connect() as conn, conn.begin():
            return fn(conn, *args)

    async def ping(self) -> bool:
        try:
            return bool(await self.read(lambda c: c.execute(text("SELECT 1")).scalar()))
        except Exception:
            return False

    async def scalar(self, statement: Any) -> Any:
        return await self.read(lambda c: c.execute(statement).scalar())

    async def stream_events(
        self, stream: str, after_seq: int, limit: int = 1000
    ) -> list[StreamRecord]:
        def load(conn: Connection) -> list[StreamRecord]:
            rows = conn.execute(
                select(
                    StreamEvent.stream,
                    StreamEvent.seq,
                    StreamEvent.type,
                    StreamEvent.at,
                    StreamEvent.payload,
                )
                .where(StreamEvent.stream == stream, StreamEvent.seq > after_seq)
                .order_by(StreamEvent.seq)
                .limit(limit)
            ).all()
            return [StreamRecord(r.stream, r.seq, r.type, r.at, r.payload) for r in rows]

        return await self.read(load)


# SQLite result codes and PostgreSQL SQLSTATEs that say the storage refuses writes, not
# that one transaction was wrong.
_SQLITE_STORAGE = ("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN")
_PG_STORAGE = {
    "53100": "disk full",
    "53200": "out of memory",
    "53000": "insufficient resources",
    "25006": "read-only transaction",
    "58030": "I/O error",
}


def storage_failure(exc: BaseException) -> str | None:
    """Why the database cannot write, when ``exc`` says so (disk full, read-only, I/O);
    None for errors of a transaction's own (a constraint, a deadlock). ``exc`` is
    SQLAlchemy's wrapper or the driver's own error (prepared statements on SQLite)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    name = getattr(orig, "sqlite_errorname", None)
    if isinstance(name, str) and name.startswith(_SQLITE_STORAGE):
        return f"{name}: {orig}"
    code = getattr(orig, "sqlstate", None) or getattr(
        getattr(orig, "__cause__", None), "sqlstate", None
    )
    if isinstance(code, str) and code in _PG_STORAGE:
        return f"{_PG_STORAGE[code]} (SQLSTATE {code})"
    return None


def _unreachable(exc: BaseException) -> str:
    """What to say about a connection that failed (no address or credentials in it)."""
    return f"the database is unreachable ({type(exc).__name__})"


def _client_state_error(exc: DBAPIError) -> bool:
    """asyncpg's protocol refused a statement because of its own state ("another operation
    is in progress"): the connection is unusable and nothing was sent."""
    return type(exc.orig).__name__ == "InternalClientError"


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.cancelled():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
