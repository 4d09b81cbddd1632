"""C-01 and C-02 seen from the server: a unit of work cancelled during a statement must stop that
statement on the server (CancelRequest), not only give its connection back.

The randomized run cannot tell: its statements last 50 ms, over long before anyone
looks. Here the statement would run for STATEMENT_SECONDS, and the server is watched.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import text

from app.database import DatabaseSessionManager
from tests.faults.cancel_invariants import connect_observer

STATEMENT_SECONDS = 20.0
MARKER = "h2-cancel-server-side"
# Only a marked statement that is running: not this query, which names the marker too.
_RUNNING = (
    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state = 'active'"
    " AND query LIKE 'SELECT pg_sleep%' AND query LIKE '%' || $2 || '%'"
)
# How long the server may take to stop it: a CancelRequest needs a round trip or two.
STOP_SECONDS = 2.0


@dataclass
class ServerSideReport:
    """How the cancelled unit of work ended, and whether its statement ran on."""

    outcome: str  # cancelled | completed | error: ...
    caller_back_seconds: float  # from the cancellation to the caller's return
    still_running: int  # marked statements running STOP_SECONDS after the return


async def _until(condition: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def cancel_running_statement(
    manager: DatabaseSessionManager, style: str, dsn: str, application_name: str
) -> ServerSideReport:
    """Start `SELECT pg_sleep(...)` in a session, cancel it in `style` once it runs, watch."""
    observer = await connect_observer(dsn, "server-side")
    cancel: Callable[[], Any] | None = None

    async def running() -> int:
        count: int = await observer.fetchval(_RUNNING, application_name, MARKER)
        return count

    async def unit() -> None:
        async with manager.session() as session:
            await session.execute(text(f"SELECT pg_sleep({STATEMENT_SECONDS}) -- {MARKER}"))

    async def in_style() -> bool:
        nonlocal cancel
        if style == "task":
            inner = asyncio.create_task(unit())
            cancel = inner.cancel
            await inner
            return False
        with anyio.CancelScope() as scope:  # cancels again at every await, as Starlette's
            cancel = scope.cancel
            await unit()
        return scope.cancelled_caught

    try:
        task = asyncio.create_task(in_style())
        started = await _until(lambda: _started(task, running), 5.0)
        if not started or task.done() or cancel is None:
            task.cancel()
            await asyncio.wait([task])
            raise AssertionError(f"the statement never ran on the server ({task!r})")
        cancelled_at = time.monotonic()
        cancel()
        await asyncio.wait([task])
        caller_back = time.monotonic() - cancelled_at
        if task.cancelled() or (task.exception() is None and task.result()):
            outcome = "cancelled"
        elif task.exception() is None:
            outcome = "completed"
        else:
            outcome = f"error: {task.exception()!r}"
        await _until(lambda: _none(running), STOP_SECONDS)
        return ServerSideReport(outcome, caller_back, await running())
    finally:
        await observer.close()


async def _started(task: asyncio.Task[bool], running: Callable[[], Awaitable[int]]) -> bool:
    return task.done() or await running() > 0  # done: failed before its statement ran


async def _none(running: Callable[[], Awaitable[int]]) -> bool:
    return await running() == 0
