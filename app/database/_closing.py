"""Closing asyncpg connections without waiting on the network, and stopping their work.

asyncpg's graceful close waits for the server's answer, up to `command_timeout`
per connection when the network is stalled. And cutting a connection in the
middle of a statement (a cancelled unit of work, a timeout, `close()` after its
grace period) does not stop the statement: PostgreSQL notices a vanished client
only when it next talks to it, so the backend runs the statement to its end,
holding its locks and its open transaction. A connection cut inside a
transaction therefore also gets PostgreSQL's CancelRequest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from sqlalchemy.engine import Engine

# A CancelRequest is one packet on a new connection; this bounds a stalled network.
CANCEL_TIMEOUT_SECONDS = 0.5
# Sent in the background, so that no request waits for them; close() does.
_cancels: set[asyncio.Task[None]] = set()


def install_prompt_close(engine: Engine) -> None:
    """Close `engine`'s asyncpg connections at once; cancel the work of busy ones."""
    dialect: Any = engine.dialect  # this engine's own dialect instance
    # The pool closes idle connections (recycle, dispose): an idle backend treats a
    # closed socket exactly like a goodbye message, so nothing is lost by not
    # waiting for the server to answer one.
    dialect.do_close = _abort
    # It terminates connections it invalidates, which may be busy.
    dialect.do_terminate = _abort_and_cancel


def _abort(dbapi_connection: Any) -> None:
    dbapi_connection.driver_connection.terminate()


def _abort_and_cancel(dbapi_connection: Any) -> None:
    connection = dbapi_connection.driver_connection
    cancel = _cancel_request(connection)
    connection.terminate()  # first, so the unit of work fails as a lost connection
    if cancel is not None:
        task = asyncio.get_running_loop().create_task(cancel)
        _cancels.add(task)
        task.add_done_callback(_cancels.discard)


def _cancel_request(connection: Any) -> Coroutine[Any, Any, None] | None:
    """A coroutine asking the server to stop `connection`'s statement; None if not needed."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None  # garbage collection outside the event loop: nothing can be sent
    if connection.is_closed() or not connection.is_in_transaction():
        # The socket is already gone (the backend has seen it too), or the backend
        # is idle: a recycled or discarded connection needs no cancel.
        return None
    # asyncpg's own CancelRequest sender. It is private: asyncpg cancels only through
    # a connection still open, and terminate() drops the cancels it has pending.
    try:
        from asyncpg import connect_utils  # here: the package imports without asyncpg

        protocol = connection._protocol
        request = connect_utils._cancel(
            loop=loop,
            addr=connection._addr,
            params=connection._params,
            backend_pid=protocol.backend_pid,
            backend_secret=protocol.backend_secret,
        )
    except (ImportError, AttributeError, TypeError):
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
