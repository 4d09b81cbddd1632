"""Telemetry on OpenTelemetry: the SQLAlchemy instrumentation's spans, and the package's own.

Read with the SDK's in-memory exporter and reader (tests/otel.py). Units of work run
on a manager of the test's own, so that they really commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import (
    CommitOutcomeUnknownError,
    DatabaseSessionManager,
    PoolExhaustedError,
    TransactionAbortedError,
    _liveness,
    _retry,
    _signals,
    _units,
)
from app.database._pool_wait import pool_name
from app.database._telemetry import (
    DISCARD_REASON,
    LIVENESS_DISCARDS,
    LIVENESS_PINGS,
    MAX_CONNECTIONS,
    OUTCOME,
    PENDING_REQUESTS,
    PING_OUTCOME,
    POOL_NAME,
    POOL_WAIT,
    READ_ONLY,
    RESET_OUTCOME,
    SESSION_STATE_RESETS,
    SQLSTATE,
    STATEMENTS,
    TIMEOUTS,
    UNIT_DURATION,
    UNIT_RETRIES,
    UNIT_SPAN,
    WAIT_TIME,
)
from tests.drivers import application_name
from tests.integration.forced_conflicts import (
    RAISE_SERIALIZATION_FAILURE,
    drop_fail_commit,
    fail_commit_when,
)
from tests.otel import Telemetry, in_memory_telemetry
from tests.postgres import count_backends

TABLE = "telemetry_rows"
APPLICATION = f"telemetry-test-{os.getpid()}"
INSTRUMENTATION = "opentelemetry.instrumentation.sqlalchemy"


@pytest.fixture(name="table")
async def table_fixture(observer: asyncpg.Connection) -> AsyncIterator[str]:
    await observer.execute(f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, fail boolean)")
    try:
        yield TABLE
    finally:
        await drop_fail_commit(observer, TABLE)
        await observer.execute(f"DROP TABLE {TABLE}")


@pytest.fixture(name="manager")
async def manager_fixture(database_url: URL, table: str) -> AsyncIterator[DatabaseSessionManager]:
    """A private manager, built (and its first connection opened) before telemetry is on."""
    manager = DatabaseSessionManager()
    manager.init(database_url, pool_size=2, connect_args=application_name(APPLICATION))
    # The dialect's first-connect queries happen here, not in the units under test.
    async with manager.session() as db:
        await db.execute(text(f"SELECT count(*) FROM {table}"))
    try:
        yield manager
    finally:
        await manager.close()


@pytest.fixture(name="telemetry")
def telemetry_fixture(manager: DatabaseSessionManager) -> Iterator[Telemetry]:
    with in_memory_telemetry() as telemetry:
        yield telemetry


def _statement(span: ReadableSpan) -> str:
    attributes = span.attributes or {}
    # The instrumentation's old and new semantic conventions name it differently.
    return str(attributes.get("db.statement", attributes.get("db.query.text", "")))


def _statement_spans(telemetry: Telemetry) -> list[ReadableSpan]:
    return [
        span
        for span in telemetry.spans()
        if span.instrumentation_scope is not None
        and span.instrumentation_scope.name == INSTRUMENTATION
        and _statement(span)
    ]


async def test_statements_are_the_instrumentations_spans_inside_a_unit_span(
    manager: DatabaseSessionManager, telemetry: Telemetry
) -> None:
    """The library's statement spans, children of the package's span for the unit."""
    async with manager.session() as db:
        await db.execute(text(f"INSERT INTO {TABLE} (fail) VALUES (false)"))
        await db.scalar(text(f"SELECT count(*) FROM {TABLE}"))

    [unit] = telemetry.spans(UNIT_SPAN)
    statements = _statement_spans(telemetry)
    assert [_statement(span) for span in statements] == [
        f"INSERT INTO {TABLE} (fail) VALUES (false)",
        f"SELECT count(*) FROM {TABLE}",
    ]
    assert all(span.parent and span.parent.span_id == unit.context.span_id for span in statements)
    attributes = dict(unit.attributes or {})
    pool_wait = attributes.pop(POOL_WAIT)
    assert isinstance(pool_wait, float)
    assert 0 <= pool_wait < 1
    assert attributes == {READ_ONLY: False, OUTCOME: "committed", STATEMENTS: 2}
    assert unit.status.status_code is StatusCode.UNSET


async def test_engines_built_before_and_after_enabling_are_traced_replicas_included(
    manager: DatabaseSessionManager, telemetry: Telemetry, database_url: URL
) -> None:
    """A manager init()ed later, and its replica's engine, are traced; earlier ones still are."""
    later = DatabaseSessionManager()
    later.init(database_url, replica_urls=[database_url])  # built, never probed here
    try:
        assert later._replicas is not None
        replica_engine = later._replicas.replicas[0].engine
        async with replica_engine.connect() as connection:
            await connection.execute(text("SELECT 'on the replica'"))
        async with later.session() as db:
            await db.execute(text("SELECT 'on the later primary'"))
    finally:
        await later.close()
    async with manager.session() as db:
        await db.execute(text("SELECT 'on the earlier primary'"))

    assert [_statement(span) for span in _statement_spans(telemetry)] == [
        "SELECT 'on the replica'",
        "SELECT 'on the later primary'",
        "SELECT 'on the earlier primary'",
    ]


async def _hold_the_only_connection(
    manager: DatabaseSessionManager, held: asyncio.Event, release: asyncio.Event
) -> None:
    async with manager.session() as db:
        await db.execute(text("SELECT 1"))
        held.set()
        await release.wait()


async def test_pool_wait_capacity_and_waiters_are_measured(
    telemetry: Telemetry, database_url: URL
) -> None:
    """A session queued behind the pool's only connection: one waiter, then its wait."""
    tight = DatabaseSessionManager()
    tight.init(database_url, pool_size=1, pool_logging_name="tight")
    held, release = asyncio.Event(), asyncio.Event()
    try:
        holder = asyncio.create_task(_hold_the_only_connection(tight, held, release))
        await held.wait()

        async def wait_then_select() -> None:
            async with tight.session() as db:
                await db.execute(text("SELECT 2"))

        waiter = asyncio.create_task(wait_then_select())
        await asyncio.sleep(0.2)  # the waiter is queued in the pool by now
        waiting = telemetry.values(PENDING_REQUESTS, POOL_NAME)
        capacity = telemetry.values(MAX_CONNECTIONS, POOL_NAME)
        release.set()
        await asyncio.gather(holder, waiter)
    finally:
        release.set()
        await tight.close()

    assert (waiting["tight"], capacity["tight"]) == (1, 1)
    [waits] = [point for a, point in telemetry.points(WAIT_TIME) if a[POOL_NAME] == "tight"]
    assert waits.count == 2
    assert waits.max >= 0.15
    # The pool's name is the one the instrumentation's connection usage carries.
    usage_names = {a["pool.name"] for a, _ in telemetry.points("db.client.connections.usage")}
    assert "tight" in usage_names
    waited = [span.attributes or {} for span in telemetry.spans(UNIT_SPAN)]
    assert sorted(float(str(a[POOL_WAIT])) >= 0.15 for a in waited) == [False, True]


async def test_a_closed_managers_pool_is_no_longer_reported(
    telemetry: Telemetry, database_url: URL
) -> None:
    """After close(), its pool's capacity and waiters leave the metrics, although the
    engine object lives on (here in `closed`): a manager opened next under the same
    name reports its own capacity, not the sum of both."""
    closed = DatabaseSessionManager()
    closed.init(database_url, pool_size=2, pool_logging_name="reopened")
    async with closed.session() as db:
        await db.execute(text("SELECT 1"))
    assert telemetry.values(MAX_CONNECTIONS, POOL_NAME)["reopened"] == 2
    await closed.close()

    assert "reopened" not in telemetry.values(MAX_CONNECTIONS, POOL_NAME)
    assert "reopened" not in telemetry.values(PENDING_REQUESTS, POOL_NAME)
    reopened = DatabaseSessionManager()
    reopened.init(database_url, pool_size=3, pool_logging_name="reopened")
    try:
        assert telemetry.values(MAX_CONNECTIONS, POOL_NAME)["reopened"] == 3
    finally:
        await reopened.close()


async def test_a_session_that_gives_up_waiting_is_counted(
    telemetry: Telemetry, database_url: URL
) -> None:
    """pool_timeout reached: db.client.connection.timeouts, and the unit rolled back."""
    tight = DatabaseSessionManager()
    tight.init(database_url, pool_size=1, pool_timeout=0.2, pool_logging_name="tight")
    held, release = asyncio.Event(), asyncio.Event()
    try:
        holder = asyncio.create_task(_hold_the_only_connection(tight, held, release))
        await held.wait()
        with pytest.raises(PoolExhaustedError):
            async with tight.session() as db:
                await db.execute(text("SELECT 2"))
        release.set()
        await holder
    finally:
        release.set()
        await tight.close()

    assert telemetry.values(TIMEOUTS, POOL_NAME) == {"tight": 1}
    assert telemetry.values(UNIT_DURATION, OUTCOME) == {"committed": 1, "rolled_back": 1}


async def test_each_units_outcome_is_recorded(
    manager: DatabaseSessionManager, telemetry: Telemetry, observer: asyncpg.Connection
) -> None:
    """committed, rolled back, COMMIT refused, COMMIT unanswered: a histogram and the span."""
    insert_failing = text(f"INSERT INTO {TABLE} (fail) VALUES (true)")
    async with manager.session() as db:
        await db.execute(text(f"INSERT INTO {TABLE} (fail) VALUES (false)"))
    with pytest.raises(LookupError):
        async with manager.session() as db:
            await db.execute(text(f"INSERT INTO {TABLE} (fail) VALUES (false)"))
            raise LookupError("the route's own error")
    await fail_commit_when(observer, TABLE, "fail")  # 40001 at COMMIT
    with pytest.raises(DBAPIError) as refused:
        async with manager.session() as db:
            await db.execute(insert_failing)
    await drop_fail_commit(observer, TABLE)
    await fail_commit_when(observer, TABLE, "fail", "admin_shutdown")  # 57P01 at COMMIT
    with pytest.raises(CommitOutcomeUnknownError):
        async with manager.session() as db:
            await db.execute(insert_failing)

    assert telemetry.values(UNIT_DURATION, OUTCOME) == {
        "committed": 1,
        "rolled_back": 1,
        "commit_failed": 1,
        "commit_outcome_unknown": 1,
    }
    spans = [
        (
            (span.attributes or {})[OUTCOME],
            (span.attributes or {}).get("error.type"),
            span.status.status_code,
        )
        for span in telemetry.spans(UNIT_SPAN)
    ]
    assert spans == [
        ("committed", None, StatusCode.UNSET),
        ("rolled_back", "LookupError", StatusCode.UNSET),
        ("commit_failed", refused.type.__qualname__, StatusCode.ERROR),
        ("commit_outcome_unknown", "CommitOutcomeUnknownError", StatusCode.ERROR),
    ]


async def test_a_failed_flush_and_a_refused_commit_are_rollbacks(
    manager: DatabaseSessionManager, telemetry: Telemetry
) -> None:
    """Nothing was sent as COMMIT: a statement error swallowed by the block is a rollback."""
    with pytest.raises(TransactionAbortedError):
        async with manager.session() as db:
            # Swallowed: the package refuses the COMMIT that follows.
            with contextlib.suppress(DBAPIError):
                await db.execute(text("SELECT 1/0"))

    assert telemetry.values(UNIT_DURATION, OUTCOME) == {"rolled_back": 1}


async def test_retries_are_counted_and_marked_on_the_callers_span(
    manager: DatabaseSessionManager, telemetry: Telemetry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_in_transaction's second attempt: a retry with its SQLSTATE, an event on the span."""
    monkeypatch.setattr(_retry, "retry_delay", lambda attempt: 0.0)
    attempts = 0

    async def work(db: AsyncSession) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            await db.execute(text(RAISE_SERIALIZATION_FAILURE))

    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request"):
        await manager.run_in_transaction(work)

    assert telemetry.values(UNIT_RETRIES, SQLSTATE) == {"40001": 1}
    assert telemetry.values(UNIT_DURATION, OUTCOME) == {"rolled_back": 1, "committed": 1}
    [request] = telemetry.spans("request")
    [retried] = request.events
    assert retried.name == "unit of work retried"
    attributes = dict(retried.attributes or {})
    assert attributes.pop("error.type") in ("DBAPIError", "OperationalError")  # by driver
    assert attributes == {"app.database.unit.attempt": 1, SQLSTATE: "40001"}


async def test_liveness_pings_and_discards_are_counted(
    manager: DatabaseSessionManager,
    telemetry: Telemetry,
    observer: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ping for a connection idle past the window; a discard for one the server ended."""
    monkeypatch.setattr(_liveness, "FRESH_SECONDS", 0.0)  # every checkout pings
    async with manager.session() as db:
        await db.execute(text("SELECT 1"))
    await observer.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        APPLICATION,
    )
    for _ in range(500):  # the backends exit asynchronously
        if not await count_backends(observer, APPLICATION):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)  # the closed socket reaches this process
    async with manager.session() as db:
        await db.execute(text("SELECT 1"))

    # asyncpg sees the socket closed; psycopg finds out by pinging.
    [(reason, discarded)] = telemetry.values(LIVENESS_DISCARDS, DISCARD_REASON).items()
    assert (reason in ("closed", "ping_failed"), discarded) == (True, 1)
    failed = {"failed": 1} if reason == "ping_failed" else {}
    assert telemetry.values(LIVENESS_PINGS, PING_OUTCOME) == {"alive": 1, **failed}
    names = {a.get(POOL_NAME) for a, _ in telemetry.points(LIVENESS_DISCARDS)}
    assert names == {pool_name(manager.engine.sync_engine)}


async def test_session_state_resets_are_counted(
    manager: DatabaseSessionManager, telemetry: Telemetry
) -> None:
    """A unit that ran a session-level SET: its connection is reset as it comes back."""
    async with manager.session() as db:
        await db.execute(text("SET application_name = 'changed by the unit'"))
    async with manager.session() as db:
        await db.execute(text("SELECT 1"))

    assert telemetry.values(SESSION_STATE_RESETS, RESET_OUTCOME) == {"reset": 1}
    [(attributes, _)] = telemetry.points(SESSION_STATE_RESETS)
    assert attributes[POOL_NAME] == pool_name(manager.engine.sync_engine)


async def test_the_commenter_option_reaches_the_instrumentation(
    manager: DatabaseSessionManager,
) -> None:
    """enable_commenter=True: the server sees the trace context in each statement's text."""
    with in_memory_telemetry(enable_commenter=True):
        async with manager.session() as db:
            seen = await db.scalar(text("SELECT current_query()"))
    async with manager.session() as db:
        untraced = await db.scalar(text("SELECT current_query()"))

    assert "traceparent=" in str(seen)
    assert "traceparent=" not in str(untraced)


async def test_with_nothing_listening_the_core_calls_no_observer(
    manager: DatabaseSessionManager, database_url: URL
) -> None:
    """Off: session() hands back the plain unit, and engines get no observers' listeners."""
    hooks = [getattr(_signals, name) for name in dir(_signals)]
    assert not any(hook for hook in hooks if isinstance(hook, _signals.Hook))
    # A hook's truth test at the call sites is the interpreter's list length check.
    assert "__bool__" not in vars(_signals.Hook)
    assert _signals.Hook.__len__ is list.__len__
    assert type(manager.session()).__name__ == "_AsyncGeneratorContextManager"
    with in_memory_telemetry():
        assert isinstance(manager.session(), _units._ObservedUnit)
    assert type(manager.session()).__name__ == "_AsyncGeneratorContextManager"

    fresh = DatabaseSessionManager()
    fresh.init(database_url)
    try:
        engine = fresh.engine.sync_engine
        assert not event.contains(engine, "before_cursor_execute", _units._count_statement)
        assert "connect" not in vars(engine.pool)
    finally:
        await fresh.close()


async def test_turned_off_nothing_more_is_emitted(
    manager: DatabaseSessionManager, telemetry: Telemetry
) -> None:
    """disable_telemetry(): no span, no metric from the units after it."""
    from app.database import disable_telemetry

    disable_telemetry()
    async with manager.session() as db:
        await db.execute(text("SELECT 'after'"))

    assert telemetry.spans() == []
    assert telemetry.points(UNIT_DURATION) == []
    assert telemetry.points(MAX_CONNECTIONS) == []


async def test_the_services_environment_turns_telemetry_and_the_slow_unit_log_on(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATABASE_TELEMETRY=1 and DATABASE_SLOW_UNIT_SECONDS=0.5, read by the lifespan."""
    from app import main
    from app.database import _slow_units, disable_telemetry, log_slow_units

    monkeypatch.setenv("DATABASE_URL", database_url.render_as_string(hide_password=False))
    monkeypatch.setenv("DATABASE_TELEMETRY", "1")
    monkeypatch.setenv("DATABASE_SLOW_UNIT_SECONDS", "0.5")
    monkeypatch.setattr(main, "session_manager", DatabaseSessionManager())
    service = main.create_app()
    try:
        async with service.router.lifespan_context(service):
            assert _signals.unit_started  # the telemetry's unit span
            assert _slow_units._Threshold.seconds == 0.5
    finally:
        disable_telemetry()
        log_slow_units(None)
    assert not _signals.unit_ended
