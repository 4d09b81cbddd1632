"""Read-only units of work: one round trip per statement, enforced by the server.

Counted through the request-path benchmark's proxy, on one pooled connection, so
that each count is the wire's and the mode switches between read and write units
are visible.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import URL

from app.database import (
    DatabaseConfigError,
    DatabaseSessionManager,
    ReadOnlyTransactionError,
    ReadSessionDep,
    ReadYourWritesMiddleware,
    _fastapi,
    _replicas,
)
from app.database._classify import sqlstate_of
from app.database._wal_position import required_position
from app.database.drivers import driver_for
from benchmarks.request_path.proxy import RoundTripProxy
from tests.postgres import checked_out
from tests.round_trips import counted_manager

TABLE = "read_only_rows"
SELECT = text(f"SELECT note FROM {TABLE} WHERE id = :id")


@pytest.fixture(name="counted")
async def counted_fixture(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[DatabaseSessionManager, RoundTripProxy]]:
    async with counted_manager(database_url, monkeypatch) as (manager, proxy):
        monkeypatch.setattr(_fastapi, "session_manager", manager)
        async with manager.engine.begin() as connection:
            await connection.execute(text(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, note text)"))
            await connection.execute(text(f"INSERT INTO {TABLE} VALUES (1, 'one'), (2, 'two')"))
        try:
            yield manager, proxy
        finally:
            async with manager.engine.begin() as connection:
                await connection.execute(text(f"DROP TABLE {TABLE}"))


async def _read(manager: DatabaseSessionManager, statements: int = 1) -> list[str | None]:
    async with manager.session(read_only=True) as session:
        return [await session.scalar(SELECT, {"id": 1 + i % 2}) for i in range(statements)]


async def _write(manager: DatabaseSessionManager) -> None:
    async with manager.session() as session:
        await session.execute(text(f"UPDATE {TABLE} SET note = note WHERE id = 1"))


async def test_a_read_only_unit_costs_one_round_trip_per_statement(
    counted: tuple[DatabaseSessionManager, RoundTripProxy],
) -> None:
    manager, proxy = counted
    for _ in range(6):  # warm-up: prepared (psycopg prepares at its 5th use), mode set
        await _read(manager, statements=2)
    proxy.reset(record=True)
    assert await _read(manager) == ["one"]
    assert proxy.round_trips == 1, proxy.trace
    proxy.reset(record=True)
    assert await _read(manager, statements=3) == ["one", "two", "one"]
    assert proxy.round_trips == 3, proxy.trace


async def test_switching_between_read_and_write_units_costs_one_round_trip_each_way(
    counted: tuple[DatabaseSessionManager, RoundTripProxy],
) -> None:
    """One connection alternately read-only and read-write: the switch is the only extra."""
    manager, proxy = counted
    for _ in range(6):
        await _read(manager)
        await _write(manager)
    proxy.reset(record=True)
    await _write(manager)  # last used by a write: no switch
    write_alone = proxy.round_trips
    proxy.reset(record=True)
    await _read(manager)
    assert proxy.round_trips == 2, proxy.trace  # the switch, then the statement
    proxy.reset(record=True)
    await _write(manager)
    assert proxy.round_trips == write_alone + 1, proxy.trace


async def test_a_write_in_a_read_only_unit_fails_clearly_and_writes_nothing(
    counted: tuple[DatabaseSessionManager, RoundTripProxy], observer: asyncpg.Connection
) -> None:
    manager, _ = counted
    with pytest.raises(ReadOnlyTransactionError, match="read-only") as raised:
        async with manager.session(read_only=True) as session:
            await session.execute(text(f"INSERT INTO {TABLE} VALUES (3, 'three')"))
    assert sqlstate_of(raised.value) == "25006"  # its cause: the server's refusal
    assert await observer.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id = 3") == 0
    # The same (only) connection, back in a read-write unit, writes.
    async with manager.session() as session:
        await session.execute(text(f"INSERT INTO {TABLE} VALUES (3, 'three')"))
    assert await observer.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id = 3") == 1


async def test_each_statement_sees_the_latest_commit_and_repeatable_read_gives_one_snapshot(
    counted: tuple[DatabaseSessionManager, RoundTripProxy], observer: asyncpg.Connection
) -> None:
    manager, _ = counted
    notes = []
    async with manager.session(read_only=True) as session:
        notes.append(await session.scalar(SELECT, {"id": 2}))
        await observer.execute(f"UPDATE {TABLE} SET note = 'changed' WHERE id = 2")
        notes.append(await session.scalar(SELECT, {"id": 2}))
    assert notes == ["two", "changed"]
    notes = []
    async with manager.session(read_only=True, isolation_level="REPEATABLE READ") as session:
        notes.append(await session.scalar(SELECT, {"id": 2}))
        await observer.execute(f"UPDATE {TABLE} SET note = 'again' WHERE id = 2")
        notes.append(await session.scalar(SELECT, {"id": 2}))
    assert notes == ["changed", "changed"]
    with pytest.raises(ReadOnlyTransactionError):
        async with manager.session(read_only=True, isolation_level="REPEATABLE READ") as session:
            await session.execute(text(f"DELETE FROM {TABLE}"))


async def test_a_failed_statement_in_a_read_only_unit_leaves_the_next_ones_working(
    counted: tuple[DatabaseSessionManager, RoundTripProxy],
) -> None:
    """Each statement is its own transaction: nothing is aborted, the unit ends normally."""
    manager, _ = counted
    async with manager.session(read_only=True) as session:
        with pytest.raises(ReadOnlyTransactionError):
            await session.execute(text(f"DELETE FROM {TABLE}"))
        assert await session.scalar(SELECT, {"id": 1}) == "one"


async def test_a_read_only_unit_after_a_session_state_reset_is_still_read_only(
    counted: tuple[DatabaseSessionManager, RoundTripProxy],
) -> None:
    """RESET ALL puts the session default back to read-write: the next read unit re-sets it."""
    manager, _ = counted
    await _read(manager)
    async with manager.session(read_only=True) as session:
        # A session-level SET in a read unit: the connection is reset as it returns.
        await session.execute(text("SET application_name = 'changed'"))
    with pytest.raises(ReadOnlyTransactionError):
        async with manager.session(read_only=True) as session:
            await session.execute(text(f"DELETE FROM {TABLE}"))


async def test_under_transaction_pooler_a_read_only_unit_is_a_read_only_transaction(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No session default behind a pooler: BEGIN READ ONLY, the statement, COMMIT."""
    async with counted_manager(database_url, monkeypatch, transaction_pooler=True) as (
        manager,
        proxy,
    ):
        for _ in range(6):
            async with manager.session(read_only=True) as session:
                await session.scalar(text("SELECT 1"))
        proxy.reset(record=True)
        async with manager.session(read_only=True) as session:
            assert await session.scalar(text("SHOW transaction_read_only")) == "on"
        # Around the statement (which asyncpg prepares each time behind a pooler).
        assert proxy.trace[0].startswith("BEGIN READ ONLY"), proxy.trace
        assert proxy.trace[-1].startswith("COMMIT"), proxy.trace
        with pytest.raises(ReadOnlyTransactionError):
            async with manager.session(read_only=True) as session:
                await session.execute(text("CREATE TEMP TABLE t (x int) ON COMMIT DROP"))


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/rows/{row_id}")
    async def read(row_id: int, db: ReadSessionDep) -> str | None:
        note: str | None = await db.scalar(SELECT, {"id": row_id})
        return note

    @app.delete("/rows/{row_id}")
    async def delete_through_read_session(row_id: int, db: ReadSessionDep) -> None:
        await db.execute(text(f"DELETE FROM {TABLE} WHERE id = :id"), {"id": row_id})

    return app


async def test_read_session_dep_serves_a_get_in_one_round_trip_and_refuses_a_write(
    counted: tuple[DatabaseSessionManager, RoundTripProxy], observer: asyncpg.Connection
) -> None:
    manager, proxy = counted
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for _ in range(6):
            (await client.get("/rows/1")).raise_for_status()
        proxy.reset(record=True)
        response = await client.get("/rows/2")
        assert response.json() == "two"
        assert proxy.round_trips == 1, proxy.trace
        assert (await client.delete("/rows/2")).status_code == 500
    assert await observer.fetchval(f"SELECT count(*) FROM {TABLE} WHERE id = 2") == 1
    # The connection went back to the pool (before the response: the test below): the
    # one connection serves.
    await asyncio.wait_for(_read(manager), 5)


async def test_read_session_dep_returns_its_connection_before_the_response_starts(
    counted: tuple[DatabaseSessionManager, RoundTripProxy],
) -> None:
    """Function-scoped like AsyncSessionDep: the unit ends, and its connection is back in
    the pool, before the response starts (request-scoped, it would end after)."""
    manager, _ = counted
    app = _app()
    in_use_when_answering: list[int] = []

    async def noting_the_pool(scope: Any, receive: Any, send: Any) -> None:
        async def send_noted(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                in_use_when_answering.append(checked_out(manager))
            await send(message)

        await app(scope, receive, send_noted)

    transport = httpx.ASGITransport(app=noting_the_pool)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/rows/1")).json() == "one"

    assert in_use_when_answering == [0]


async def test_a_write_pays_one_round_trip_for_its_wal_position_only_with_replicas(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read after COMMIT, for read-your-writes; without replicas nothing is read."""
    monkeypatch.setattr(_replicas, "PROBE_INTERVAL_SECONDS", 3600.0)  # probes out of the count
    # Nothing listens on port 1: the replica is set aside by its first probe.
    unreachable = database_url.set(host="127.0.0.1", port=1)
    counts = {}
    for replicas in ([], [unreachable]):
        async with counted_manager(database_url, monkeypatch, replica_urls=replicas) as (
            manager,
            proxy,
        ):
            await manager.verify_replicas()
            await asyncio.sleep(0.2)  # the background probe's first round, too
            for _ in range(6):
                await _write_returning(manager)
            proxy.reset(record=True)
            await _write_returning(manager)
            counts[bool(replicas)] = list(proxy.trace)
    without, with_replicas = counts[False], counts[True]
    # The same unit (its BEGIN may name the level: the pool resets a connection used
    # in autocommit to the server's default level), then one more round trip.
    assert len(with_replicas) == len(without) + 1, (without, with_replicas)
    assert with_replicas[1:-1] == without[1:], (without, with_replicas)


async def test_the_cookie_lives_as_long_as_init_max_replica_lag_says(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ReadYourWritesMiddleware takes the cookie's life from the manager that committed:
    max_replica_lag=7 in init(), so 7 + 2.5 s, rounded up. The middleware has no lag of
    its own that could be set shorter and let a lagging replica serve the next read."""
    monkeypatch.setattr(_replicas, "PROBE_INTERVAL_SECONDS", 3600.0)
    unreachable = database_url.set(host="127.0.0.1", port=1)  # the commit's position is read
    async with counted_manager(
        database_url, monkeypatch, replica_urls=[unreachable], max_replica_lag=7.0
    ) as (manager, _):
        app = FastAPI()

        @app.post("/write")
        async def write() -> None:
            await _write_returning(manager)

        app.add_middleware(ReadYourWritesMiddleware)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/write")

    assert "; Max-Age=10;" in response.headers["set-cookie"]


async def _write_returning(manager: DatabaseSessionManager) -> None:
    async with manager.session() as session:
        await session.execute(text("SELECT 1"))


async def test_streaming_in_a_read_only_unit_needs_a_transaction_and_says_so(
    counted: tuple[DatabaseSessionManager, RoundTripProxy],
) -> None:
    manager, _ = counted
    query = text(f"SELECT note FROM {TABLE} ORDER BY id")
    with pytest.raises(DatabaseConfigError, match="isolation_level"):
        async with manager.session(read_only=True) as session:
            await session.stream(query)
    with pytest.raises(DatabaseConfigError, match="isolation_level"):
        async with manager.session(read_only=True) as session:
            await session.execute(query.execution_options(yield_per=1))
    async with manager.session(read_only=True, isolation_level="REPEATABLE READ") as session:
        notes = [row.note async for row in await session.stream(query)]
    assert notes == ["one", "two"]


async def test_a_cancelled_switch_of_the_read_only_default_returns_its_connection(
    counted: tuple[DatabaseSessionManager, RoundTripProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled during the switch's round trip: the connection is not left checked out."""
    manager, _ = counted
    driver = driver_for(manager.engine.dialect.driver)
    assert driver is not None
    switched = asyncio.Event()
    run_simple = driver.run_simple

    async def slow_switch(connection: object, sql: str, timeout: float) -> None:
        if sql.startswith("SET SESSION CHARACTERISTICS"):
            switched.set()
            await asyncio.sleep(30)
        await run_simple(connection, sql, timeout)

    monkeypatch.setattr(driver, "run_simple", slow_switch)
    reading = asyncio.create_task(_read(manager))
    await asyncio.wait_for(switched.wait(), 5)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert checked_out(manager) == 0
    monkeypatch.undo()
    assert await _read(manager) == ["one"]  # the pool serves on


async def test_a_write_in_a_task_the_request_started_raises_the_requests_floor(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gather() runs the write in a task of its own; the route's later reads still see it."""
    monkeypatch.setattr(_replicas, "PROBE_INTERVAL_SECONDS", 3600.0)
    unreachable = database_url.set(host="127.0.0.1", port=1)
    async with counted_manager(database_url, monkeypatch, replica_urls=[unreachable]) as (
        manager,
        _,
    ):
        monkeypatch.setattr(_fastapi, "session_manager", manager)
        app = FastAPI()

        @app.post("/write")
        async def write(db: ReadSessionDep) -> int:
            async def in_a_task() -> None:
                async with manager.session() as session:
                    await session.execute(text("SELECT 1"))

            await asyncio.gather(in_a_task())
            return required_position()

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.post("/write")).json() > 0


async def test_a_unit_that_fails_pays_no_wal_position_round_trip(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The position is read only after a COMMIT, on the committing connection."""
    monkeypatch.setattr(_replicas, "PROBE_INTERVAL_SECONDS", 3600.0)
    unreachable = database_url.set(host="127.0.0.1", port=1)
    traces = []
    for replicas in ([], [unreachable]):
        async with counted_manager(database_url, monkeypatch, replica_urls=replicas) as (
            manager,
            proxy,
        ):
            await manager.verify_replicas()
            await asyncio.sleep(0.2)
            for _ in range(6):
                await _write_returning(manager)
            proxy.reset(record=True)
            with pytest.raises(LookupError):
                async with manager.session() as session:
                    await session.execute(text("SELECT 1"))
                    raise LookupError
            traces.append(list(proxy.trace))
    assert len(traces[1]) == len(traces[0]), traces
