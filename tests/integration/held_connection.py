"""A manager one of whose connections a unit of work holds, in a task of its own.

The set-up of the tests of `close()` that watch what becomes of a connection in use
(test_session_manager.py, test_engine_hooks.py), and the states they wait for before
acting: observed (polled, with a bound), not assumed after a number of event-loop
ticks, which would tie each test to how many awaits the code under test makes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import DatabaseSessionManager
from app.database._drain import Drain

POLL_SECONDS = 0.005


async def until(
    condition: Callable[[], bool | Awaitable[bool]], what: str, within: float = 10.0
) -> None:
    """Return once `condition()` (or the coroutine it returns) is true; fail naming `what`."""

    async def reached() -> None:
        while True:
            holds = condition()
            if await holds if inspect.isawaitable(holds) else holds:
                return
            await asyncio.sleep(POLL_SECONDS)

    try:
        await asyncio.wait_for(reached(), within)
    except asyncio.TimeoutError:  # TimeoutError itself only from Python 3.11
        pytest.fail(f"{what}: not reached within {within} s")


@dataclass
class Holder:
    """The manager, and the task of the unit of work holding one of its connections."""

    manager: DatabaseSessionManager
    task: asyncio.Task[Any]
    released: asyncio.Event
    drain: Drain  # the manager's when the connection was taken: close() takes it off

    def release(self) -> None:
        """Let the unit of work go on: to its `then`, and to its end."""
        self.released.set()

    def draining(self) -> bool:
        """Whether a close() has begun draining the engine the connection came from.

        From then on the engine refuses new connections, and the drain waits for the
        connection in use (or cuts it, once its grace period is over).
        """
        return self.drain._closing


@asynccontextmanager
async def holding_a_connection(
    url: URL,
    *,
    then: Callable[[AsyncSession], Awaitable[Any]] | None = None,
    idle: bool = False,
    **engine_kwargs: Any,
) -> AsyncIterator[Holder]:
    """A new manager on `url`, entered once a task holds one of its connections.

    The task's unit of work ran a statement and waits, inside its transaction, until
    released; then it runs `then(session)`, whose result is the task's. `idle=True`:
    the task holds a connection of the engine whose transaction it committed (its
    backend idle, outside any transaction), and only waits. On exit the task is
    released and awaited; its outcome is the test's to check. The manager is the
    test's to close.
    """
    assert not (idle and then), "an idle connection runs nothing once released"
    manager = DatabaseSessionManager()
    manager.init(url=url, **engine_kwargs)
    assert manager._drain is not None
    holding, released = asyncio.Event(), asyncio.Event()

    async def unit_of_work() -> Any:
        if idle:
            async with manager.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
                await connection.commit()
                holding.set()
                await released.wait()
            return None
        async with manager.session() as db:
            await db.execute(text("SELECT 1"))
            holding.set()
            await released.wait()
            return None if then is None else await then(db)

    task = asyncio.create_task(unit_of_work())
    held = asyncio.create_task(holding.wait())
    try:
        await asyncio.wait({task, held}, return_when=asyncio.FIRST_COMPLETED)
        if not holding.is_set():
            await task  # it failed before holding a connection: that error is the test's
        yield Holder(manager, task, released, manager._drain)
    finally:
        held.cancel()
        released.set()
        await asyncio.gather(task, return_exceptions=True)
