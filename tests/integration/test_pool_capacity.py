"""The pool's shape: pool_size + max_overflow connections, all kept, most recent first."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import exc, func, select
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import DatabaseSessionManager


@pytest.fixture(name="small_pool")
async def small_pool_fixture(database_url: URL) -> AsyncIterator[DatabaseSessionManager]:
    """A private manager allowed two connections (1 + 1 overflow), waiting 0.3 s at most."""
    manager = DatabaseSessionManager()
    manager.init(url=database_url, pool_size=1, max_overflow=1, pool_timeout=0.3)
    yield manager
    await manager.close()


async def _backend_pid(db: AsyncSession) -> int:
    pid: int | None = await db.scalar(select(func.pg_backend_pid()))
    assert pid is not None
    return pid


@asynccontextmanager
async def _both_connections_in_use(manager: DatabaseSessionManager) -> AsyncIterator[None]:
    """Two units of work each holding a connection until the block ends."""
    release, both_in = asyncio.Event(), asyncio.Event()
    holding: list[int] = []

    async def hold() -> None:
        async with manager.session() as db:
            holding.append(await db.scalar(select(1)) or 0)
            if len(holding) == 2:
                both_in.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(2)]
    await both_in.wait()
    try:
        yield
    finally:
        release.set()
        await asyncio.gather(*holders)


async def test_capacity_is_pool_size_plus_max_overflow(small_pool: DatabaseSessionManager) -> None:
    """Two units of work run at once; a third waits pool_timeout, then fails clearly."""
    async with _both_connections_in_use(small_pool):
        started = time.monotonic()
        with pytest.raises(exc.TimeoutError, match="QueuePool limit of size 2 overflow 0"):
            async with small_pool.session() as db:
                await db.scalar(select(1))
        waited = time.monotonic() - started

    assert waited < 5  # bounded by pool_timeout=0.3, generously


async def test_the_connection_used_last_is_handed_out_first(
    small_pool: DatabaseSessionManager,
) -> None:
    """After a burst opened both connections, sequential work keeps reusing one of them."""
    async with _both_connections_in_use(small_pool):
        pass

    pids = []
    for _ in range(4):
        async with small_pool.session() as db:
            pids.append(await _backend_pid(db))

    # LIFO: the same connection each time, so the liveness check finds it fresh
    # and the spare one stays idle; FIFO would alternate between the two.
    assert len(set(pids)) == 1, pids
