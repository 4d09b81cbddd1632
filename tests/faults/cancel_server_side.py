"""C-01 and C-02 seen from the server: a unit of work cancelled during a statement must stop that
statement on the server (CancelRequest), not only give its connection back.

The randomized run cannot tell: its statements last 50 ms, over long before anyone
looks. Here the statement would run for STATEMENT_SECONDS, and the server is watched.
A second scenario makes the first CancelRequest come too early: the backend is
stopped (SIGSTOP) with the statement sent to it and not yet read.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from app.database import DatabaseSessionManager
from tests.faults.cancel_invariants import connect_observer

STATEMENT_SECONDS = 20.0
MARKER = "h2-cancel-server-side"
# A statement run once with this parameter before the real one: asyncpg then sends
# the real one at once (its prepared statement is cached), as psycopg always does.
_SLEEP = f"SELECT pg_sleep(:seconds) -- {MARKER}"
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
    ran_after_the_cancel: bool = False  # the early-cancel scenario: the backend ignored it


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
    # Its own, so that a statement an earlier run left behind is not taken for this one.
    marker = f"{MARKER}-{secrets.token_hex(4)}"

    async def running() -> int:
        count: int = await observer.fetchval(_RUNNING, application_name, marker)
        return count

    async def unit() -> None:
        async with manager.session() as session:
            await session.execute(text(f"SELECT pg_sleep({STATEMENT_SECONDS}) -- {marker}"))

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
        # A statement left running would hold its backend for STATEMENT_SECONDS.
        await observer.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1"
            " AND query LIKE '%' || $2 || '%' AND pid <> pg_backend_pid()",
            application_name,
            marker,
        )
        await observer.close()


async def cancel_before_the_backend_reads(
    manager: DatabaseSessionManager, dsn: str, stopped_seconds: float
) -> ServerSideReport:
    """Cancel a unit of work whose statement waits, unread, at a stopped backend.

    PostgreSQL ignores a CancelRequest that reaches an idle backend, and the cut
    connection's backend reads the statement once it runs again: only a CancelRequest
    sent after that stops it. The backend is this test's own, continued (and, if it
    runs on, terminated) whatever happens.
    """
    observer = await connect_observer(dsn, "early-cancel")
    backend: int | None = None

    async def active() -> bool:
        state = await observer.fetchval(
            "SELECT state FROM pg_stat_activity WHERE pid = $1", backend
        )
        return bool(state == "active")

    async def unit() -> None:
        nonlocal backend
        async with manager.session() as session:
            pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            await session.execute(text(_SLEEP), {"seconds": 0})
            os.kill(pid, signal.SIGSTOP)
            backend = pid
            await session.execute(text(_SLEEP), {"seconds": STATEMENT_SECONDS})

    task = asyncio.create_task(unit())
    try:
        if not await _until(_known(lambda: backend, task), 5.0) or backend is None:
            if task.done() and isinstance(task.exception(), PermissionError):
                pytest.skip("stopping a backend takes root or the server's own user")
            raise AssertionError(f"the unit of work never reached its statement ({task!r})")
        await asyncio.sleep(0.2)  # the statement is in the backend's socket by now
        cancelled_at = time.monotonic()
        task.cancel()
        await asyncio.wait([task])
        caller_back = time.monotonic() - cancelled_at
        outcome = "cancelled" if task.cancelled() else f"not cancelled: {task!r}"
        await asyncio.sleep(stopped_seconds)
        os.kill(backend, signal.SIGCONT)
        ran = await _until(active, 0.5)
        await _until(_not(active), STOP_SECONDS)
        still = int(await active())
        return ServerSideReport(outcome, caller_back, still, ran_after_the_cancel=ran)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
        if backend is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(backend, signal.SIGCONT)
            await observer.execute("SELECT pg_terminate_backend($1)", backend)
        await observer.close()


def _known(value: Callable[[], object], task: asyncio.Task[None]) -> Callable[[], Awaitable[bool]]:
    async def known() -> bool:
        return value() is not None or task.done()

    return known


def _not(condition: Callable[[], Awaitable[bool]]) -> Callable[[], Awaitable[bool]]:
    async def negated() -> bool:
        return not await condition()

    return negated


async def _started(task: asyncio.Task[bool], running: Callable[[], Awaitable[int]]) -> bool:
    return task.done() or await running() > 0  # done: failed before its statement ran


async def _none(running: Callable[[], Awaitable[int]]) -> bool:
    return await running() == 0
