"""Bounded waits on asyncpg: no request or shutdown waits on a dead network for long.

asyncpg raises a bare `TimeoutError` when `command_timeout` expires, which
SQLAlchemy neither wraps nor treats as a lost connection: the session's ROLLBACK
would then wait a second `command_timeout` on the same silent socket, and the
connection would go back to the pool to fail the next request too. And closing a
connection waits for the server's goodbye, up to `command_timeout` per
connection when the network is stalled.

Cutting a connection in the middle of a statement (a cancelled task, a timeout,
`close()` after its grace period) does not stop the statement: PostgreSQL
notices a vanished client only when it next talks to it, so the backend runs the
statement to its end, holding its locks and its open transaction. A cut
connection's backend is therefore also sent PostgreSQL's CancelRequest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from asyncpg import connect_utils
from sqlalchemy import event
from sqlalchemy.engine import Engine, ExceptionContext


def install_bounded_waits(engine: Engine) -> None:
    """Discard connections whose statement timed out; close connections without waiting."""
    event.listen(engine, "handle_error", _timeout_means_lost_connection)
    dialect: Any = engine.dialect
    # The pool closes a connection on recycle, overflow, invalidation and dispose.
    # An idle PostgreSQL backend treats a closed socket exactly like a goodbye
    # message, so nothing is lost by not waiting for the server to answer one.
    dialect.do_close = _abort
    # The pool terminates (rather than closes) a connection it invalidates, which
    # may be busy; it closes only idle ones.
    dialect.do_terminate = _abort_and_cancel


def _timeout_means_lost_connection(context: ExceptionContext) -> None:
    if isinstance(context.original_exception, TimeoutError):
        # The server never answered in time: whether the connection still works is
        # unknown, so it is invalidated (closed, never reused) instead of rolled back.
        context.is_disconnect = True


def _abort(dbapi_connection: Any) -> None:
    dbapi_connection.driver_connection.terminate()


# A CancelRequest is one packet on a new connection; this bounds a stalled network.
CANCEL_TIMEOUT_SECONDS = 0.5
# Sent in the background, so that no request waits for them; close() does.
_cancels: set[asyncio.Task[None]] = set()


def _abort_and_cancel(dbapi_connection: Any) -> None:
    connection = dbapi_connection.driver_connection
    cancel = _cancel_request(connection)
    connection.terminate()  # first, so the unit of work fails as a lost connection
    if cancel is not None:
        task = asyncio.get_running_loop().create_task(cancel)
        _cancels.add(task)
        task.add_done_callback(_cancels.discard)


def _cancel_request(connection: Any) -> Coroutine[Any, Any, None] | None:
    """A coroutine asking the server to stop `connection`'s statement; None if it cannot."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None  # garbage collection outside the event loop: nothing can be sent
    if connection.is_closed():
        return None  # the socket is already gone: the backend has seen it too
    # asyncpg's own CancelRequest sender. It is private: asyncpg cancels only through
    # a connection still open, and terminate() drops the cancels it has pending.
    try:
        protocol = connection._protocol
        request = connect_utils._cancel(
            loop=loop,
            addr=connection._addr,
            params=connection._params,
            backend_pid=protocol.backend_pid,
            backend_secret=protocol.backend_secret,
        )
    except (AttributeError, TypeError):
        return None  # another asyncpg: the cut still happens, uncancelled
    return _send_cancel(request)


async def _send_cancel(request: Any) -> None:
    # Best effort: if it fails, the statement runs to its end, as it would without it.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(request, CANCEL_TIMEOUT_SECONDS)


async def cancels_sent() -> None:
    """Wait for the CancelRequests of connections cut so far on this loop (bounded)."""
    loop = asyncio.get_running_loop()
    pending = [task for task in _cancels if task.get_loop() is loop]
    if pending:
        await asyncio.wait(pending)
