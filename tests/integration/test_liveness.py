"""The cheap liveness check: connections that died in the pool never fail a request."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import ConnectionPoolEntry

from app.database import DatabaseSessionManager, _liveness
from app.database import _signals as signals
from tests.drivers import application_name, backend_pid
from tests.postgres import count_backends

APPLICATION = f"liveness-test-{os.getpid()}"


@pytest.fixture(name="manager")
async def manager_fixture(database_url: URL) -> AsyncIterator[DatabaseSessionManager]:
    """A private manager whose backends can be found by their application_name."""
    manager = DatabaseSessionManager()
    manager.init(
        url=database_url,
        pool_size=3,
        max_overflow=0,
        connect_args=application_name(APPLICATION),
    )
    yield manager
    await manager.close()


async def _backend_pids(observer: asyncpg.Connection) -> list[int]:
    rows = await observer.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1", APPLICATION
    )
    return [row["pid"] for row in rows]


async def _select_one(manager: DatabaseSessionManager) -> int | None:
    async with manager.session() as db:
        return await db.scalar(select(1))


@pytest.mark.parametrize("fresh_seconds", [_liveness.FRESH_SECONDS, 0.0], ids=["fresh", "stale"])
async def test_requests_succeed_after_every_pooled_connection_was_killed(
    manager: DatabaseSessionManager,
    observer: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    fresh_seconds: float,
) -> None:
    """pg_terminate_backend on every idle pooled connection, then 10 requests: all succeed."""
    monkeypatch.setattr(_liveness, "FRESH_SECONDS", fresh_seconds)
    await asyncio.gather(*(_select_one(manager) for _ in range(3)))
    killed = await _backend_pids(observer)
    assert len(killed) == 3

    await observer.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        APPLICATION,
    )
    for _ in range(500):  # the backends exit asynchronously; give them up to 5 s
        if not await count_backends(observer, APPLICATION):
            break
        await asyncio.sleep(0.01)
    # "Died while idle": let the closed sockets reach this process. A kill racing
    # a checkout by less than that is the documented limit of the skipped ping.
    await asyncio.sleep(0.2)

    results = [await _select_one(manager) for _ in range(10)]

    assert results == [1] * 10
    assert not set(await _backend_pids(observer)) & set(killed)


@pytest.mark.parametrize(
    ("fresh_seconds", "pinged"), [(60.0, False), (0.0, True)], ids=["used-moments-ago", "idle"]
)
async def test_ping_is_sent_only_for_a_connection_idle_longer_than_the_window(
    manager: DatabaseSessionManager,
    observer: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    fresh_seconds: float,
    pinged: bool,
) -> None:
    """A recently returned connection is reused as is; an idle one is pinged and kept."""
    monkeypatch.setattr(_liveness, "FRESH_SECONDS", fresh_seconds)
    async with manager.engine.connect() as connection:
        first_pid = await _server_pid(connection)

    async with manager.engine.connect() as connection:
        pid = await _server_pid(connection)
        last_query = await observer.fetchval(
            "SELECT query FROM pg_stat_activity WHERE pid = $1", pid
        )

    # The same backend both times: a healthy connection is never replaced.
    assert pid == first_pid
    assert (last_query == "SELECT 1") is pinged, last_query


async def _server_pid(connection: AsyncConnection) -> int:
    raw = await connection.get_raw_connection()
    return backend_pid(raw.driver_connection)


async def test_a_connection_whose_server_stops_answering_is_replaced(
    manager: DatabaseSessionManager, observer: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle pooled connection whose backend hangs fails its ping and is replaced."""
    monkeypatch.setattr(_liveness, "FRESH_SECONDS", 0.0)
    monkeypatch.setattr(_liveness, "PING_TIMEOUT_SECONDS", 0.2)
    async with manager.engine.connect() as connection:
        hung = await _server_pid(connection)
    try:
        # A stopped backend keeps its socket open and answers nothing: what a
        # silently dead peer looks like from here, and only the ping can tell.
        os.kill(hung, signal.SIGSTOP)
    except PermissionError:
        pytest.skip("needs to signal PostgreSQL's backend processes (run as root or postgres)")
    try:
        assert await _select_one(manager) == 1
        async with manager.engine.connect() as connection:
            assert await _server_pid(connection) != hung
    finally:
        os.kill(hung, signal.SIGCONT)
        await observer.execute("SELECT pg_terminate_backend($1)", hung)


class _Clock:
    """A monotonic clock that moves only when told: the window without waiting for it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture(name="outcomes")
def outcomes_fixture() -> Iterator[list[str]]:
    """The liveness check's outcomes, as a listener of its hook hears them."""
    heard: list[str] = []

    def listener(_: ConnectionPoolEntry, outcome: str) -> None:
        heard.append(outcome)

    signals.liveness_checked.connect(listener)
    yield heard
    signals.liveness_checked.disconnect(listener)


async def test_the_freshness_window_runs_from_the_last_checkin(
    manager: DatabaseSessionManager, monkeypatch: pytest.MonkeyPatch, outcomes: list[str]
) -> None:
    """Idle for less than FRESH_SECONDS since its checkin: no ping; for the whole window: one."""
    clock = _Clock()
    monkeypatch.setattr(_liveness, "time", clock)
    async with manager.engine.connect() as connection:
        await connection.scalar(select(1))
    outcomes.clear()

    clock.now += _liveness.FRESH_SECONDS / 2
    async with manager.engine.connect() as connection:
        await connection.scalar(select(1))
    assert outcomes == []

    clock.now += _liveness.FRESH_SECONDS
    async with manager.engine.connect() as connection:
        await connection.scalar(select(1))
    assert outcomes == ["alive"]


async def test_listeners_hear_a_ping_answered_and_a_ping_failed(
    manager: DatabaseSessionManager, monkeypatch: pytest.MonkeyPatch, outcomes: list[str]
) -> None:
    """Its hook's listeners hear "alive" for an answered ping, "ping_failed" for a failed one."""
    monkeypatch.setattr(_liveness, "FRESH_SECONDS", 0.0)
    async with manager.engine.connect() as connection:
        await connection.scalar(select(1))
    outcomes.clear()
    async with manager.engine.connect() as connection:
        await connection.scalar(select(1))
    assert outcomes == ["alive"]

    def ping_lost(coroutine: Coroutine[Any, Any, None]) -> None:
        coroutine.close()
        raise ConnectionResetError("the ping's answer never came")

    outcomes.clear()
    monkeypatch.setattr(_liveness, "await_only", ping_lost)
    # The pool drops the connection whose ping failed and checks out a new one.
    async with manager.engine.connect() as connection:
        assert await connection.scalar(select(1)) == 1
    assert outcomes == ["ping_failed"]
