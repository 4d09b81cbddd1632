"""Session state does not leak between requests that reuse a pooled connection (L-01 to L-03).

Every test runs on a private manager with one connection, so that request B is
served by the very backend request A changed; `pg_backend_pid()` proves it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import nullcontext
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import TextClause, event, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import SAWarning
from sqlalchemy.ext.asyncio import AsyncConnection

from app.database import AsyncSessionDep, DatabaseSessionManager, _fastapi
from app.database import _session_state as session_state
from app.database import _signals as signals
from benchmarks.request_path.proxy import RoundTripProxy
from tests.drivers import DRIVER, application_name
from tests.postgres import asyncpg_dsn, checked_out
from tests.round_trips import counted_manager

APPLICATION = f"h3-state-{os.getpid()}"
ROLE = f"h3_state_role_{os.getpid()}"  # roles are cluster-wide: named after this process
LOCK_KEY = 42

# What a request can see of its session. asyncpg's own prepared statements are
# left out: each new statement text adds one, and the reset must keep them.
PROBE = text(
    "SELECT pg_backend_pid() AS pid,"
    " coalesce(current_setting('app.tenant_id', true), '') AS tenant,"
    " current_setting('search_path') AS search_path,"
    " current_user::text AS current_user, session_user::text AS session_user,"
    " current_setting('statement_timeout') AS statement_timeout,"
    " current_setting('default_transaction_read_only') AS read_only,"
    " current_setting('application_name') AS application_name,"
    " (SELECT count(*) FROM pg_listening_channels()) AS listening,"
    " (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS prepared,"
    " (SELECT count(*) FROM pg_cursors WHERE is_holdable) AS held_cursors,"
    " (SELECT count(*) FROM pg_locks"
    "   WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory_locks,"
    " (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()) AS temp_relations"
)
# psycopg prepares a statement on the server at its 5th execution.
PSYCOPG_PREPARE_THRESHOLD = 5
DRIVER_STATEMENTS = text("SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql")

STATE_CHANGES = {
    "set-guc": "SET app.tenant_id = '1'",
    "set-config": "SELECT set_config('app.tenant_id', '1', false)",
    "search-path": "SET search_path TO pg_catalog",
    "role": f"SET ROLE {ROLE}",
    "session-authorization": f"SET SESSION AUTHORIZATION {ROLE}",
    # Not 1 ms: a limit that short could cancel the test's own COMMIT on a busy machine.
    "statement-timeout": "SET statement_timeout = 12345",
    "read-only": "SET default_transaction_read_only = on",
    "advisory-lock": f"SELECT pg_advisory_lock({LOCK_KEY})",
    "listen": "LISTEN h3_state_channel",
    "prepare": "PREPARE h3_state_statement AS SELECT 1",
    "temp-table": "CREATE TEMP TABLE h3_state_table (x int)",
    "held-cursor": "DECLARE h3_state_cursor CURSOR WITH HOLD FOR SELECT 1",
    # A DO body is not read: any DO block costs a reset.
    "do-search-path": "DO $$BEGIN SET search_path TO pg_catalog; END$$",
    "do-execute-timeout": "DO $$BEGIN EXECUTE 'SET statement_timeout = 4321'; END$$",
    "select-into-temp": "SELECT 1 AS x INTO TEMP h3_state_selected",
    "pg-temp-table": "CREATE TABLE pg_temp.h3_state_named (x int)",
}


@pytest.fixture(name="role", scope="module")
async def role_fixture(database_url: URL) -> AsyncIterator[str]:
    """A role of this process's own for `SET ROLE`, dropped after the module."""
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await connection.execute(f"DROP ROLE IF EXISTS {ROLE}")  # left by a crashed run
        await connection.execute(f"CREATE ROLE {ROLE}")
        yield ROLE
    finally:
        await connection.execute(f"DROP ROLE IF EXISTS {ROLE}")
        await connection.close()


async def _open_manager(url: URL) -> DatabaseSessionManager:
    manager = DatabaseSessionManager()
    # One connection: every unit of work and request reuses the same backend.
    manager.init(
        url=url,
        pool_size=1,
        max_overflow=0,
        connect_args=application_name(APPLICATION),
    )
    return manager


@pytest.fixture(name="manager")
async def manager_fixture(
    database_url: URL, role: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[DatabaseSessionManager]:
    """A private one-connection manager, also behind `get_db` / `AsyncSessionDep`."""
    manager = await _open_manager(database_url)
    monkeypatch.setattr(_fastapi, "session_manager", manager)
    yield manager
    await manager.close()


def _app(statement: str, probe_query: TextClause = PROBE) -> FastAPI:
    app = FastAPI()

    @app.post("/change")
    async def change(db: AsyncSessionDep) -> None:
        await db.execute(text(statement))

    @app.get("/probe")
    async def probe(db: AsyncSessionDep) -> dict[str, Any]:
        return dict((await db.execute(probe_query)).mappings().one())

    return app


Step = Callable[[str], Awaitable[dict[str, Any]]]
"""Runs step "change" (the statement) or "probe", in a request or unit of work of its own."""


@pytest.fixture(name="through", params=["request", "unit-of-work"])
def through_fixture(
    request: pytest.FixtureRequest, manager: DatabaseSessionManager
) -> Callable[[str], Step]:
    """How the statements reach the database: ASGI requests using AsyncSessionDep, or session()."""

    def by_unit_of_work(statement: str) -> Step:
        async def run(step: str) -> dict[str, Any]:
            async with manager.session() as db:
                if step == "change":
                    await db.execute(text(statement))
                    return {}
                return dict((await db.execute(PROBE)).mappings().one())

        return run

    def by_request(statement: str) -> Step:
        return functools.partial(_in_a_request, statement)

    return by_request if request.param == "request" else by_unit_of_work


async def _in_a_request(
    statement: str, step: str, probe_query: TextClause = PROBE
) -> dict[str, Any]:
    """Runs `step` ("change": the statement; "probe") as an ASGI request using AsyncSessionDep."""
    transport = httpx.ASGITransport(app=_app(statement, probe_query))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        if step == "change":
            (await client.post("/change")).raise_for_status()
            return {}
        response = await client.get("/probe")
        response.raise_for_status()
        probed: dict[str, Any] = response.json()
        return probed


@pytest.mark.parametrize("statement", STATE_CHANGES.values(), ids=STATE_CHANGES.keys())
async def test_session_state_changed_by_one_request_is_gone_in_the_next(
    through: Callable[[str], Step], statement: str
) -> None:
    """Request B, on the backend request A changed, sees exactly what a request saw before A."""
    run = through(statement)
    before = await run("probe")
    await run("change")
    after = await run("probe")

    assert after["pid"] == before["pid"], "not the same backend: the test proves nothing"
    assert after == before


@pytest.mark.parametrize("statement", STATE_CHANGES.values(), ids=STATE_CHANGES.keys())
async def test_without_the_reset_the_next_request_would_see_the_change(
    manager: DatabaseSessionManager, statement: str
) -> None:
    """Negative control: with the package's reset removed, the probe does see each change."""
    event.remove(manager.engine.sync_engine, "reset", session_state._reset_session_state)
    async with manager.session() as db:
        before = dict((await db.execute(PROBE)).mappings().one())
    async with manager.session() as db:
        await db.execute(text(statement))
    async with manager.session() as db:
        after = dict((await db.execute(PROBE)).mappings().one())

    assert after["pid"] == before["pid"]
    assert after != before


async def test_an_advisory_lock_left_held_by_a_request_is_free_for_another_connection(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """A request's forgotten pg_advisory_lock is released when its connection returns."""
    transport = httpx.ASGITransport(app=_app(f"SELECT pg_advisory_lock({LOCK_KEY})"))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        (await client.post("/change")).raise_for_status()
        pid = (await client.get("/probe")).json()["pid"]

    # The backend is still open and pooled: only the reset can have released it.
    assert await _backend_open(observer, pid)
    assert await observer.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY) is True
    assert await observer.fetchval("SELECT pg_advisory_unlock($1)", LOCK_KEY) is True


# The multi-tenant recipe: each connection enters its tenant's schema and role once,
# when it is made; a row-level-security policy then shows the role its own rows only.
TENANT_ROLE = f"h3_tenant_role_{os.getpid()}"
TENANT_SCHEMA = "h3_tenant"
TENANT_PROBE = text(
    "SELECT pg_backend_pid() AS pid, current_setting('search_path') AS search_path,"
    " current_user::text AS current_user,"
    " current_setting('statement_timeout') AS statement_timeout,"
    " (SELECT count(*) FROM pg_listening_channels()) AS listening,"
    f" (SELECT count(*) FROM {TENANT_SCHEMA}.notes) AS visible_notes"
)


@pytest.fixture(name="tenant_schema", scope="module")
async def tenant_schema_fixture(database_url: URL) -> AsyncIterator[None]:
    """A schema whose notes table lets TENANT_ROLE see 1 of its 2 rows; dropped afterwards."""
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await connection.execute(f"DROP ROLE IF EXISTS {TENANT_ROLE}")  # left by a crashed run
        await connection.execute(
            f"CREATE ROLE {TENANT_ROLE};"
            f" CREATE SCHEMA {TENANT_SCHEMA};"
            f" GRANT USAGE ON SCHEMA {TENANT_SCHEMA} TO {TENANT_ROLE};"
            f" CREATE TABLE {TENANT_SCHEMA}.notes (tenant text, body text);"
            f" GRANT SELECT ON {TENANT_SCHEMA}.notes TO {TENANT_ROLE};"
            f" ALTER TABLE {TENANT_SCHEMA}.notes ENABLE ROW LEVEL SECURITY;"
            f" CREATE POLICY own_notes ON {TENANT_SCHEMA}.notes USING (tenant = current_user);"
            f" INSERT INTO {TENANT_SCHEMA}.notes VALUES ('{TENANT_ROLE}', 'mine'), ('other', 'x')"
        )
        yield
    finally:
        await connection.execute(
            f"DROP SCHEMA IF EXISTS {TENANT_SCHEMA} CASCADE; DROP ROLE IF EXISTS {TENANT_ROLE}"
        )
        await connection.close()


def _enter_tenant(dbapi_connection: Any, _: Any) -> None:
    # SQLAlchemy's recipe for per-connection setup: in autocommit, so that it lasts.
    dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    for statement in (
        f"SET search_path TO {TENANT_SCHEMA}",
        f"SET ROLE {TENANT_ROLE}",
        "SET statement_timeout = '54s'",
        "LISTEN h3_tenant_events",
    ):
        cursor.execute(statement)
    cursor.close()
    dbapi_connection.autocommit = False


@pytest.fixture(name="tenant_client")
async def tenant_client_fixture(
    database_url: URL, tenant_schema: None, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[[str], Awaitable[dict[str, Any]]]]:
    """Sends "change:<statement>" or "probe" as requests, on one connection set up as the tenant."""
    manager = await _open_manager(database_url)
    event.listen(manager.engine.sync_engine, "connect", _enter_tenant)
    monkeypatch.setattr(_fastapi, "session_manager", manager)

    async def send(step: str) -> dict[str, Any]:
        if step.startswith("change:"):
            return await _in_a_request(step.removeprefix("change:"), "change", TENANT_PROBE)
        return await _in_a_request("", "probe", TENANT_PROBE)

    try:
        yield send
    finally:
        await manager.close()


TENANT_CHANGES = {
    "advisory-lock": f"SELECT pg_advisory_lock({LOCK_KEY})",
    "search-path": "SET search_path TO public",
    "reset-role": "RESET ROLE",
    "reset-all": "RESET ALL",
    "role-none": "SET ROLE NONE",
    "session-authorization": "SET SESSION AUTHORIZATION DEFAULT",
    "unlisten": "UNLISTEN *",
    "do-reset-role": "DO $$BEGIN EXECUTE 'RESET ROLE'; END$$",
}


@pytest.mark.parametrize("statement", TENANT_CHANGES.values(), ids=TENANT_CHANGES.keys())
async def test_a_reset_keeps_the_services_connect_time_setup(
    tenant_client: Callable[[str], Awaitable[dict[str, Any]]], statement: str
) -> None:
    """After the reset the next request is the tenant again: row-level security still holds."""
    before = await tenant_client("probe")
    assert before["current_user"] == TENANT_ROLE, before
    assert before["visible_notes"] == 1, before
    await tenant_client(f"change:{statement}")
    after = await tenant_client("probe")

    assert after["pid"] == before["pid"], "not the same backend: the test proves nothing"
    assert after == before


async def test_a_reset_to_a_bare_login_would_bypass_row_level_security(
    tenant_client: Callable[[str], Awaitable[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: without the connect-time state restored, the login role sees every row."""
    monkeypatch.setattr(session_state, "CONNECT_STATE_SQL", "SELECT ''")
    before = await tenant_client("probe")
    await tenant_client(f"change:SELECT pg_advisory_lock({LOCK_KEY})")
    after = await tenant_client("probe")

    assert after["pid"] == before["pid"]
    assert before["visible_notes"] == 1, before
    assert after["visible_notes"] == 2, after
    assert after["current_user"] != TENANT_ROLE


@pytest.mark.parametrize(
    "statement",
    [
        "SET LOCAL app.tenant_id = '1'",
        "SELECT set_config('app.tenant_id', '1', true)",
        f"SELECT pg_advisory_xact_lock({LOCK_KEY})",
    ],
    ids=["set-local", "set-config-local", "xact-advisory-lock"],
)
async def test_transaction_scoped_state_is_gone_after_its_request_without_a_reset(
    manager: DatabaseSessionManager, statement: str
) -> None:
    """SET LOCAL, set_config(..., true) and xact locks end with their transaction: no reset."""
    async with manager.session() as db:
        before = dict((await db.execute(PROBE)).mappings().one())
    async with manager.session() as db:
        await db.execute(text(statement))
        inside = dict((await db.execute(PROBE)).mappings().one())
        assert inside != before, "the statement changed nothing: the test proves nothing"
        connection = await db.connection()
        assert session_state._CHANGED not in connection.info, "it would cost a reset"
    async with manager.session() as db:
        after = dict((await db.execute(PROBE)).mappings().one())

    assert after == before


@pytest.fixture(name="counted")
async def counted_fixture(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[DatabaseSessionManager, RoundTripProxy]]:
    """A one-connection manager behind the round-trip-counting proxy, with a table to write."""
    async with counted_manager(
        database_url, monkeypatch, connect_args=application_name(APPLICATION)
    ) as (manager, proxy):
        monkeypatch.setattr(_fastapi, "session_manager", manager)
        async with manager.engine.begin() as connection:
            await connection.execute(
                text("CREATE TABLE h3_state_rows (id int PRIMARY KEY, note text)")
            )
        try:
            yield manager, proxy
        finally:
            async with manager.engine.begin() as connection:
                await connection.execute(text("DROP TABLE h3_state_rows"))


def _rows_app() -> FastAPI:
    app = FastAPI()

    @app.post("/rows/{row_id}")
    async def insert(row_id: int, db: AsyncSessionDep) -> None:
        await db.execute(
            text("INSERT INTO h3_state_rows (id, note) VALUES (:id, 'new')"), {"id": row_id}
        )

    @app.get("/rows/{row_id}")
    async def read(row_id: int, db: AsyncSessionDep) -> str | None:
        note: str | None = await db.scalar(
            text("SELECT note FROM h3_state_rows WHERE id = :id"), {"id": row_id}
        )
        return note

    @app.patch("/rows/{row_id}")
    async def update(row_id: int, db: AsyncSessionDep) -> None:
        await db.execute(
            text("UPDATE h3_state_rows SET note = 'set' WHERE id = :id"), {"id": row_id}
        )

    @app.put("/tenant/{tenant}")
    async def tenant(tenant: str, db: AsyncSessionDep, scope: str = "session") -> str | None:
        statements = {
            "session": "SELECT set_config('app.tenant_id', :tenant, false)",
            "transaction": "SELECT set_config('app.tenant_id', :tenant, true)",
        }
        value: str | None = await db.scalar(text(statements[scope]), {"tenant": tenant})
        return value

    return app


async def test_plain_requests_pay_no_reset_and_one_that_changed_state_pays_one_round_trip(
    counted: tuple[DatabaseSessionManager, RoundTripProxy],
) -> None:
    """SELECT, INSERT, UPDATE ... SET, set_config(.., true): 3 round trips; a session SET: 4."""
    _, proxy = counted
    transport = httpx.ASGITransport(app=_rows_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

        async def trace(method: str, path: str) -> list[str]:
            proxy.reset(record=True)
            (await client.request(method, path)).raise_for_status()
            return proxy.trace

        calls = [
            ("POST", "/rows/1"),
            ("GET", "/rows/1"),
            ("PATCH", "/rows/1"),
            ("PUT", "/tenant/7?scope=transaction"),
            ("PUT", "/tenant/7?scope=session"),
        ]
        for method, path in calls:  # warm-up: each statement prepared once
            await trace(method, path.replace("/1", "/2"))
        plain = {(method, path): await trace(method, path) for method, path in calls[:4]}
        dirty = await trace("PUT", "/tenant/7?scope=session")
        after_reset = await trace("GET", "/rows/1")

    for call, steps in plain.items():
        assert len(steps) == 3, (call, steps)  # BEGIN, the statement, COMMIT
        assert not any(step.startswith("CLOSE ALL") for step in steps), (call, steps)
    assert len(dirty) == 4, dirty
    assert dirty[-1].startswith("CLOSE ALL; SET SESSION AUTHORIZATION"), dirty
    # The reset left asyncpg's prepared statements alone: nothing is prepared again.
    assert after_reset == plain["GET", "/rows/1"]


async def test_the_reset_keeps_the_drivers_prepared_statements(
    manager: DatabaseSessionManager,
) -> None:
    """No DEALLOCATE ALL: the statements the driver prepared before the reset are all kept."""
    async with manager.session() as db:
        for _ in range(PSYCOPG_PREPARE_THRESHOLD + 1):  # asyncpg prepares at once
            await db.execute(PROBE)
        cached = await db.scalar(DRIVER_STATEMENTS)
        await db.execute(text("SET app.tenant_id = '1'"))
    async with manager.session() as db:
        still_cached = await db.scalar(DRIVER_STATEMENTS)
        probed = dict((await db.execute(PROBE)).mappings().one())

    assert cached is not None
    assert still_cached is not None
    assert cached >= 1
    assert still_cached >= cached  # none removed (asyncpg adds the SET's own)
    assert probed["tenant"] == ""


async def test_a_statement_no_reset_can_undo_discards_the_connection(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """After LOAD, which no reset undoes, the connection is closed: the next one is new."""
    async with manager.session() as db:
        loaded = await db.scalar(text("SELECT pg_backend_pid()"))
        await db.execute(text("LOAD 'plpgsql'"))
    async with manager.session() as db:
        pid = await db.scalar(text("SELECT pg_backend_pid()"))

    assert pid != loaded
    assert await _backend_exits(observer, loaded)


async def _backend_exits(observer: asyncpg.Connection, pid: int | None) -> bool:
    """Whether backend `pid` is gone within 5 s (a closed backend exits asynchronously)."""
    for _ in range(500):
        if not await _backend_open(observer, pid):
            return True
        await asyncio.sleep(0.01)
    return False


async def _backend_open(observer: asyncpg.Connection, pid: int | None) -> bool:
    count = await observer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
    return bool(count)


async def _dirty_connection_whose_reset_blocks(
    connection: AsyncConnection, observer: asyncpg.Connection
) -> tuple[int, Any]:
    """Leave a temp table, and lock it from `observer` so that the reset's DISCARD TEMP waits."""
    await connection.execute(text("CREATE TEMP TABLE h3_state_blocked (x int)"))
    pid: int | None = await connection.scalar(text("SELECT pg_backend_pid()"))
    schema = await connection.scalar(text("SELECT pg_my_temp_schema()::regnamespace::text"))
    # Committed, so the observer sees the table; the connection stays checked out (a
    # session's commit would return it to the pool, and so reset it, right here).
    await connection.commit()
    transaction = observer.transaction()
    await transaction.start()
    await observer.execute(f"LOCK TABLE {schema}.h3_state_blocked IN ACCESS SHARE MODE")
    assert pid is not None
    return pid, transaction


async def test_a_reset_that_times_out_discards_the_connection(
    manager: DatabaseSessionManager,
    observer: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reset that cannot finish in time closes the connection; it is never handed out dirty."""
    monkeypatch.setattr(session_state, "RESET_TIMEOUT_SECONDS", 0.3)
    async with manager.engine.connect() as connection:
        await connection.execute(text("SET app.tenant_id = '1'"))
        blocked, lock = await _dirty_connection_whose_reset_blocks(connection, observer)
    try:
        async with manager.session() as db:
            probed = dict((await db.execute(PROBE)).mappings().one())
    finally:
        await lock.rollback()

    assert probed["pid"] != blocked
    assert probed["tenant"] == ""
    assert await _backend_exits(observer, blocked)
    assert checked_out(manager) == 0


async def test_a_reset_cancelled_midway_discards_the_connection(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """Cancelling the close that runs the reset closes the connection instead of pooling it."""
    connection = await manager.engine.connect()
    blocked, lock = await _dirty_connection_whose_reset_blocks(connection, observer)
    closing = asyncio.create_task(connection.close())  # unshielded, unlike `async with`
    try:
        for _ in range(500):  # until the reset waits for the observer's lock: up to 5 s
            if await observer.fetchval(
                "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", blocked
            ):
                break
            await asyncio.sleep(0.01)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
    finally:
        await lock.rollback()

    assert checked_out(manager) == 0
    assert await _backend_exits(observer, blocked)
    async with manager.session() as db:
        assert await db.scalar(text("SELECT pg_backend_pid()")) != blocked


def _transaction_sqlalchemy_does_not_know_of(sync_connection: Connection) -> None:
    # The DBAPI adapter's own cursor begins a transaction behind the Connection's back.
    sync_connection.connection.dbapi_connection.cursor().execute("SELECT 1")  # type: ignore[union-attr]  # checked out: not None


@pytest.mark.parametrize(
    ("how", "reused"),
    # A transaction the adapter does not know of: asyncpg's adapter then does not roll
    # it back, so the connection is discarded; psycopg's rolls back what psycopg knows.
    [("adapter", True), ("driver", DRIVER == "psycopg")],
    ids=["adapter", "driver"],
)
async def test_a_connection_returned_inside_a_transaction_is_reset_outside_it(
    manager: DatabaseSessionManager, observer: asyncpg.Connection, how: str, reused: bool
) -> None:
    """An open transaction is rolled back before the reset, which it would undo; else discarded."""
    async with manager.engine.connect() as connection:
        await connection.execute(text("SET app.tenant_id = '1'"))
        await connection.commit()
        dirty = await connection.scalar(text("SELECT pg_backend_pid()"))
        await connection.commit()
        if how == "adapter":
            await connection.run_sync(_transaction_sqlalchemy_does_not_know_of)
        else:  # a transaction even the adapter does not know of: only the driver does
            raw = await connection.get_raw_connection()
            await raw.driver_connection.execute("BEGIN")  # type: ignore[union-attr]
    async with manager.session() as db:
        probed = dict((await db.execute(PROBE)).mappings().one())

    assert probed["tenant"] == ""
    assert (probed["pid"] == dirty) is reused
    assert await _backend_open(observer, dirty) is reused


async def test_a_garbage_collected_connection_is_discarded_without_a_reset(
    manager: DatabaseSessionManager,
    observer: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dirty connection never returned is terminated by the pool; no reset I/O is attempted."""
    caplog.set_level(logging.INFO, logger="sqlalchemy.pool")
    connection = await manager.engine.connect()
    await connection.execute(text(f"SELECT pg_advisory_lock({LOCK_KEY})"))
    abandoned = await connection.scalar(text("SELECT pg_backend_pid()"))
    del connection

    # psycopg also warns of its own connection, deleted unclosed.
    driver_warns = pytest.warns(ResourceWarning) if DRIVER == "psycopg" else nullcontext()
    with pytest.warns(SAWarning, match="garbage collector is trying to clean up"), driver_warns:
        gc.collect()

    assert await _backend_exits(observer, abandoned)
    assert await observer.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY) is True
    await observer.execute("SELECT pg_advisory_unlock_all()")
    # Had the reset been tried outside the event loop's greenlet, it would have failed
    # and been logged (and its coroutine never awaited would have warned).
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert not [m for m in logged if "garbage collector" not in m], logged
    async with manager.session() as db:
        assert await db.scalar(text("SELECT pg_backend_pid()")) != abandoned


@pytest.mark.parametrize(
    ("statement", "effect"),
    [
        ("SET app.tenant_id = '1'", "reset"),
        ("set search_path to pg_catalog", "reset"),
        ("  /* tenant */ SET ROLE x", "reset"),
        ("-- note\nSET SESSION AUTHORIZATION x", "reset"),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "reset"),
        ("SELECT set_config('a', 'b', false)", "reset"),
        ("SELECT set_config('a', $1::VARCHAR, $2::BOOLEAN)", "reset"),
        ("SELECT pg_catalog.set_config('a', lower('B'), 'off')", "reset"),
        ("SELECT pg_advisory_lock(1)", "reset"),
        ("SELECT pg_try_advisory_lock_shared($1::INTEGER)", "reset"),
        ("LISTEN ch", "reset"),
        ("PREPARE p AS SELECT 1", "reset"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "reset"),
        ("CREATE TEMP TABLE t (x int)", "reset"),
        ("CREATE LOCAL TEMPORARY TABLE t (x int)", "reset"),
        ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", "reset"),
        ("SELECT 1; SET x = 1", "reset"),
        ("DO $$BEGIN SET search_path TO s; END$$", "reset"),
        ("do $$begin execute 'SET statement_timeout = 4321'; end$$", "reset"),
        ("SELECT 1 AS x INTO TEMP t", "reset"),
        ("SELECT * INTO TEMPORARY TABLE t FROM items", "reset"),
        ("CREATE TABLE pg_temp.t (x int)", "reset"),
        ('CREATE UNLOGGED TABLE "pg_temp".t (x int)', "reset"),
        ("CREATE VIEW pg_temp_3.v AS SELECT 1", "reset"),
        ("SELECT 1 INTO LOCAL TEMP t", "reset"),
        ("SELECT 1 INTO GLOBAL TEMPORARY TABLE t", "reset"),
        ("SELECT 1 INTO TABLE pg_temp.t", "reset"),
        ("CREATE TABLE IF NOT EXISTS pg_temp.t (x int)", "reset"),
        # They undo the service's connect-time setup (a SET ROLE): reset to restore it.
        ("RESET ALL", "reset"),
        ("reset role", "reset"),
        ("DISCARD ALL", "reset"),
        ("UNLISTEN *", "reset"),
        ("LOAD 'auto_explain'", "discard"),
        ("SET LOCAL app.tenant_id = '1'", None),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
        ("SET CONSTRAINTS ALL IMMEDIATE", None),
        ("SELECT set_config('a', 'b', true)", None),
        ("SELECT set_config('a', lower('B'), TRUE)", None),
        ("SELECT pg_advisory_xact_lock(1)", None),
        ("SELECT pg_try_advisory_xact_lock_shared(1)", None),
        ("SELECT pg_advisory_unlock(1)", None),
        ("UPDATE items SET name = $1::VARCHAR WHERE items.id = $2::INTEGER", None),
        ("INSERT INTO settings (name) VALUES ('SET x')", None),
        ("SELECT name FROM items WHERE name LIKE 'LISTEN%'", None),
        ("CREATE TABLE t (x int)", None),
        ("INSERT INTO items (id) VALUES (1) ON CONFLICT DO NOTHING", None),
        ("SELECT * INTO items_copy FROM items", None),
        ("SELECT temperature FROM readings", None),
        ("SELECT * FROM pg_temp.t", None),
        ("INSERT INTO temp VALUES (1)", None),
        ("MERGE INTO temp USING src ON true WHEN MATCHED THEN DO NOTHING", None),
        ("CREATE TABLE t AS SELECT * FROM pg_temp.stage", None),
        ("CREATE INDEX ON pg_temp.stage (x)", None),
        ("DEALLOCATE p", None),
    ],
)
def test_statements_are_told_apart_by_their_session_effect(
    statement: str, effect: str | None
) -> None:
    """Session-level statements count, transaction-scoped ones and plain DML do not."""
    assert session_state.session_effect(statement) == effect


def _become_tenant(dbapi_connection: Any, _: Any) -> None:
    # A superuser-only setting first, then SET SESSION AUTHORIZATION: the restore
    # must set them in that order too, or the reset fails and discards the connection.
    dbapi_connection.autocommit = True
    cursor = dbapi_connection.cursor()
    cursor.execute("SET log_min_duration_statement = 54321")
    cursor.execute(f"SET SESSION AUTHORIZATION {TENANT_ROLE}")
    cursor.close()
    dbapi_connection.autocommit = False


async def test_a_reset_keeps_a_connect_time_session_authorization(
    database_url: URL, tenant_schema: None
) -> None:
    """The session user and a superuser-only setting both survive, on the same backend."""
    manager = await _open_manager(database_url)
    event.listen(manager.engine.sync_engine, "connect", _become_tenant)
    probe = text(
        "SELECT pg_backend_pid() AS pid, session_user::text AS session_user,"
        " current_setting('log_min_duration_statement') AS slow"
    )
    try:
        async with manager.session() as db:
            before = dict((await db.execute(probe)).mappings().one())
            await db.execute(text("SET SESSION AUTHORIZATION DEFAULT"))
        async with manager.session() as db:
            after = dict((await db.execute(probe)).mappings().one())
    finally:
        await manager.close()

    assert before["session_user"] == TENANT_ROLE, before
    assert after == before


async def test_a_connection_whose_state_could_not_be_read_is_closed_instead_of_reset(
    manager: DatabaseSessionManager,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed read never refuses the connection; it only forbids reusing a changed one."""
    monkeypatch.setattr(session_state, "CONNECT_STATE_SQL", "SELECT * FROM h3_no_such_table")
    with caplog.at_level(logging.WARNING, logger="app.database"):
        async with manager.session() as db:
            first = await db.scalar(text("SELECT pg_backend_pid()"))
            await db.execute(text("SET statement_timeout = 4321"))
    async with manager.session() as db:
        after = dict((await db.execute(PROBE)).mappings().one())

    assert "reading a new connection's session state failed" in caplog.text
    assert after["pid"] != first, "reused without knowing what to restore"
    assert after["statement_timeout"] != "4321ms"


async def test_listeners_hear_a_reset_that_failed(
    manager: DatabaseSessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session_state_reset hook's listeners hear "failed" when a reset fails (its
    connection is then closed), as they hear "reset" when one succeeds."""
    heard: list[str] = []

    def listener(_: Any, outcome: str) -> None:
        heard.append(outcome)

    async with manager.session() as db:  # the connect-time state is read at first checkout
        await db.execute(text("SELECT 1"))

    def reset_lost(coroutine: Any) -> None:
        coroutine.close()
        raise ConnectionResetError("the reset's answer never came")

    signals.session_state_reset.connect(listener)
    try:
        async with manager.session() as db:
            await db.execute(text("SET application_name = 'changed by the unit'"))
        async with manager.session() as db:
            await db.execute(text("SET application_name = 'changed again'"))
            monkeypatch.setattr(session_state, "await_only", reset_lost)
    finally:
        signals.session_state_reset.disconnect(listener)

    assert heard == ["reset", "failed"]


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT set_config('a', 'x,y', true)",
        "SELECT set_config('a','b',true)",
        "SELECT set_config('a', 'b', true), 1, 2",
    ],
    ids=["comma in a literal", "no spaces", "more after the call"],
)
def test_a_local_set_config_is_read_argument_by_argument(statement: str) -> None:
    """set_config's arguments are split at the commas outside literals and nested calls, up
    to the call's own closing parenthesis: each of these is transaction-local (no effect)."""
    assert session_state.session_effect(statement) is None


def test_a_local_set_config_does_not_hide_what_follows_it() -> None:
    """After a transaction-local set_config, the same statement's advisory lock still counts."""
    statement = "SELECT set_config('a', 'b', true), pg_advisory_lock(1)"

    assert session_state.session_effect(statement) == "reset"


async def test_a_connection_whose_connect_state_is_unknown_is_closed_not_reset(
    manager: DatabaseSessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new connection whose connect-time state could not be read is closed, not reset,
    once it changes session state (nothing says what to restore); listeners hear "closed"."""
    heard: list[str] = []

    def listener(_: Any, outcome: str) -> None:
        heard.append(outcome)

    def unreadable(coroutine: Any) -> None:
        coroutine.close()
        raise RuntimeError("a catalog the read needs is missing")

    monkeypatch.setattr(session_state, "await_only", unreadable)
    signals.session_state_reset.connect(listener)
    try:
        async with manager.session() as db:  # the first checkout: the read fails
            await db.execute(text("SET application_name = 'changed by the unit'"))
    finally:
        signals.session_state_reset.disconnect(listener)

    assert heard == ["closed"]
