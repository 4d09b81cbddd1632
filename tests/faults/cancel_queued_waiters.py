"""C-06: sessions cancelled while they wait in the pool's queue for a connection must leave every
pool slot free once the holders let go.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import anyio
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from app.database import DatabaseSessionManager
from tests.faults.cancel_workload import connections_held
from tests.postgres import checked_out


@dataclass
class QueueReport:
    """What 20 pool waiters, 15 of them cancelled, left behind."""

    cancelled: int
    served: int
    checked_out_after: int
    concurrent_after: int  # checkouts that then succeeded at the same time


def pool_waiters(pool: QueuePool) -> int:
    """How many checkouts wait in `pool`'s queue for a connection to come back."""
    # SQLAlchemy has no public count of them (QueuePool.status() gives size, idle,
    # overflow and checked out). Its asyncio pools (2.0 and 2.1) keep idle connections
    # in an AsyncAdaptedQueue around an asyncio.Queue, whose pending getters are exactly
    # the checkouts parked in the queue; a cancelled one is done, then removed.
    getters = getattr(getattr(getattr(pool, "_pool", None), "_queue", None), "_getters", None)
    if getters is None:
        raise AssertionError(
            f"cannot count the checkouts waiting in {type(pool).__name__}: SQLAlchemy no "
            "longer keeps them in pool._pool._queue._getters (an asyncio.Queue's getters)"
        )
    return sum(not getter.done() for getter in getters)


async def _until_waiting(pool: QueuePool, expected: int, when: str) -> None:
    # Bounded by the pool's timeout: a checkout that waited longer has failed, so the
    # queue would never reach `expected` (on a machine too loaded to queue them in time).
    deadline = time.monotonic() + pool.timeout()
    while (waiting := pool_waiters(pool)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{when}, {waiting} checkouts waited in the pool's queue instead of "
                f"{expected}, still after {pool.timeout():g} s (the pool's timeout)"
            )
        await asyncio.sleep(0.001)


async def cancel_queued_waiters(
    manager: DatabaseSessionManager, style: str, waiters: int = 20, cancelled: int = 15
) -> QueueReport:
    """Saturate the pool, queue `waiters` sessions, cancel `cancelled` of them, release.

    `style` is "task" (task.cancel) or "anyio" (each waiter in its own CancelScope).
    """
    engine = manager.engine
    pool = engine.pool
    assert isinstance(pool, QueuePool), f"expected a QueuePool, got {type(pool).__name__}"
    capacity = pool.size()
    scopes: list[anyio.CancelScope] = []
    queued: list[asyncio.Task[bool]] = []

    async def wait_for_pool() -> bool:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            async with manager.session() as session:
                await session.execute(text("SELECT 1"))  # the checkout waits here
        return scope.cancelled_caught

    try:
        async with connections_held(engine, capacity):
            queued += [asyncio.create_task(wait_for_pool()) for _ in range(waiters)]
            # Every waiter must be parked in the queue when the cancellations come.
            # Having entered session() is not enough: the checkout starts at the first
            # statement, and how many loop turns it takes to park varies (on Python
            # 3.10, asyncio.wait_for parks it from a task of its own, a turn later).
            await _until_waiting(pool, waiters, "before the cancellations")
            for index in range(cancelled):
                if style == "task":
                    queued[index].cancel()
                else:
                    scopes[index].cancel()
            # Before any connection comes back, check that each cancellation reached a
            # parked checkout: what C-06 is about, so verified, not assumed. It holds at
            # once (task.cancel() and CancelScope.cancel() cancel the awaited future).
            await _until_waiting(pool, waiters - cancelled, "after the cancellations")
    finally:
        if queued:  # once the holders let go, the others are served (or time out)
            await asyncio.wait(queued)
    errors = [task.exception() for task in queued if not task.cancelled() and task.exception()]
    if errors:
        raise AssertionError(f"queued sessions failed: {errors!r}")
    gone = sum(task.cancelled() or task.result() for task in queued)
    checked_out_after = checked_out(manager)
    # Every slot must be free again: `capacity` checkouts at once, within pool_timeout.
    async with connections_held(engine, capacity):
        concurrent_after = checked_out(manager)
    return QueueReport(gone, waiters - gone, checked_out_after, concurrent_after)
