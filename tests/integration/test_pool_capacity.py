"""The pool's shape: the sizes passed, as given; by default a fixed pool, most recent first."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import exc, func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

import app.health
from app.database import DatabaseSessionManager
from app.main import create_app
from tests.drivers import application_name
from tests.postgres import count_backends, settled_backend_count

OpenPool = Callable[..., Awaitable[tuple[DatabaseSessionManager, str]]]


@pytest.fixture(name="open_pool")
async def open_pool_fixture(database_url: URL) -> AsyncIterator[OpenPool]:
    """Opens private managers with the given init() options; returns each with the
    application_name its backends carry. Closes them after the test."""
    managers: list[DatabaseSessionManager] = []

    async def open_pool(**options: Any) -> tuple[DatabaseSessionManager, str]:
        name = f"pool-shape-{uuid.uuid4().hex[:12]}"
        manager = DatabaseSessionManager()
        manager.init(url=database_url, connect_args=application_name(name), **options)
        managers.append(manager)
        return manager, name

    yield open_pool
    for manager in managers:
        await manager.close()


def _queue_pool(manager: DatabaseSessionManager) -> QueuePool:
    pool = manager.engine.pool
    assert isinstance(pool, QueuePool), f"expected a QueuePool, got {type(pool).__name__}"
    return pool


async def _backend_pid(db: AsyncSession) -> int:
    pid: int | None = await db.scalar(select(func.pg_backend_pid()))
    assert pid is not None
    return pid


@asynccontextmanager
async def _connections_in_use(manager: DatabaseSessionManager, count: int) -> AsyncIterator[None]:
    """`count` units of work each holding a connection until the block ends."""
    release, all_in = asyncio.Event(), asyncio.Event()
    holding: list[int] = []

    async def hold() -> None:
        async with manager.session() as db:
            holding.append(await db.scalar(select(1)) or 0)
            if len(holding) == count:
                all_in.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(count)]
    await all_in.wait()
    try:
        yield
    finally:
        release.set()
        await asyncio.gather(*holders)


async def test_capacity_is_pool_size_plus_max_overflow(open_pool: OpenPool) -> None:
    """1 + 1 overflow: two units of work run at once; a third waits pool_timeout, then fails."""
    manager, _ = await open_pool(pool_size=1, max_overflow=1, pool_timeout=0.3)

    async with _connections_in_use(manager, 2):
        started = time.monotonic()
        with pytest.raises(exc.TimeoutError, match="QueuePool limit of size 1 overflow 1"):
            async with manager.session() as db:
                await db.scalar(select(1))
        waited = time.monotonic() - started

    assert waited < 5  # bounded by pool_timeout=0.3, generously


async def test_an_explicit_overflow_is_kept_as_given(
    open_pool: OpenPool, observer: asyncpg.Connection
) -> None:
    """pool_size=1, max_overflow=1 stays that: size() 1, and the overflow connection is
    closed when it comes back, as SQLAlchemy's QueuePool does (the cost the package's
    default of max_overflow=0 avoids)."""
    manager, name = await open_pool(pool_size=1, max_overflow=1)
    pool = _queue_pool(manager)

    async with _connections_in_use(manager, 2):
        assert (pool.size(), pool.checkedout(), pool.overflow()) == (1, 2, 1)
        assert await count_backends(observer, name) == 2

    assert (pool.size(), pool.checkedin(), pool.overflow()) == (1, 1, 0)
    # The closed overflow connection's server process exits a moment later.
    assert await settled_backend_count(observer, name, 1) == 1


async def test_the_default_pool_is_fixed_and_keeps_what_it_opens(
    open_pool: OpenPool, observer: asyncpg.Connection
) -> None:
    """No sizes passed: 15 connections, no overflow; a burst's connections all stay open."""
    manager, name = await open_pool()
    pool = _queue_pool(manager)
    assert (pool.size(), pool._max_overflow) == (15, 0)  # no public accessor for the latter

    async with _connections_in_use(manager, 3):
        pass

    assert (pool.checkedin(), pool.checkedout()) == (3, 0)
    assert await count_backends(observer, name) == 3


async def test_the_connection_used_last_is_handed_out_first(open_pool: OpenPool) -> None:
    """After a burst opened both kept connections, sequential work keeps reusing one."""
    manager, _ = await open_pool(pool_size=2, max_overflow=0)
    async with _connections_in_use(manager, 2):
        pass

    pids = []
    for _ in range(4):
        async with manager.session() as db:
            pids.append(await _backend_pid(db))

    # LIFO: the same connection each time, so the liveness check finds it fresh
    # and the spare one stays idle; FIFO would alternate between the two.
    assert len(set(pids)) == 1, pids


async def test_health_reports_the_pool_shape_asked_for(
    open_pool: OpenPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/health's counters are the given pool's: size 3, and overflow in use beyond it."""
    manager, _ = await open_pool(pool_size=3, max_overflow=2)
    monkeypatch.setattr(app.health, "session_manager", manager)
    transport = httpx.ASGITransport(app=create_app())

    async with (
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        _connections_in_use(manager, 4),
    ):
        response = await client.get("/health")

    assert response.status_code == 200
    # 4 held (1 of them overflow), plus /health's own round trip on a 5th, the second
    # overflow connection, back in the pool (which had room) by the time it counts.
    assert response.json()["pool"] == {
        "class": "AsyncAdaptedQueuePool",
        "size": 3,
        "checkedin": 1,
        "checkedout": 4,
        "overflow": 2,
    }
