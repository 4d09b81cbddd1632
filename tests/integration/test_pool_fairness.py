"""Units of work are admitted first come, first served, and a full pool answers in time.

Why admission is queued at all (waiters on SQLAlchemy's pool can be overtaken
for seconds under a burst) is shown by benchmarks/request_path, not timed here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import exc, select
from sqlalchemy.engine import URL

from app.database import DatabaseSessionManager


@pytest.fixture(name="single_connection")
async def single_connection_fixture(
    database_url: URL,
) -> AsyncIterator[DatabaseSessionManager]:
    """A private manager whose pool holds exactly one connection."""
    manager = DatabaseSessionManager()
    manager.init(url=database_url, pool_size=1, max_overflow=0, pool_timeout=0.3)
    yield manager
    await manager.close()


async def test_units_of_work_are_admitted_in_arrival_order_up_to_pool_capacity(
    single_connection: DatabaseSessionManager,
) -> None:
    """With room for one, units of work run one at a time, in the order they arrived."""
    inside: list[int] = []
    admitted: list[int] = []
    most_at_once = 0

    async def unit_of_work(number: int) -> None:
        nonlocal most_at_once
        async with single_connection.session():
            inside.append(number)
            admitted.append(number)
            most_at_once = max(most_at_once, len(inside))
            await asyncio.sleep(0.01)
            inside.remove(number)

    tasks = []
    for number in range(5):
        tasks.append(asyncio.create_task(unit_of_work(number)))
        await asyncio.sleep(0)  # let it queue before the next one arrives
    await asyncio.gather(*tasks)

    assert most_at_once == 1
    assert admitted == [0, 1, 2, 3, 4]


async def test_full_pool_raises_timeout_after_pool_timeout(
    single_connection: DatabaseSessionManager,
) -> None:
    """With the only connection held, another unit of work fails after pool_timeout."""
    async with single_connection.session() as holder:
        await holder.scalar(select(1))
        started = time.monotonic()
        with pytest.raises(exc.TimeoutError, match="no database connection became free"):
            async with single_connection.session() as waiting:
                await waiting.scalar(select(1))
        waited = time.monotonic() - started

    assert waited < 5  # bounded by pool_timeout=0.3, generously
