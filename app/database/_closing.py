"""Closing connections without waiting on the network, and stopping their work.

A driver's graceful close waits for the server's answer, up to its statement
timeout per connection when the network is stalled. And cutting a connection in
the middle of a statement (a cancelled unit of work, a timeout, `close()` after
its grace period) does not stop the statement: PostgreSQL notices a vanished
client only when it next talks to it, so the backend runs the statement to its
end, holding its locks and its open transaction. A connection cut inside a
transaction therefore also gets PostgreSQL's CancelRequest, and directly
connected gets it twice more: a backend ignores a CancelRequest that reaches it
before it has read the statement (idle, it has nothing to cancel), which a busy
machine can delay.

Directly connected, the cut comes first, so the unit of work fails at once as a
lost connection. Through a transaction pooler the CancelRequest comes first:
PgBouncer forwards a cancel only while the client's connection to it is open.
It is not repeated there: repeats would keep the pooler's server connection
tied up for 0.5 s more per cancelled unit of work, and send PgBouncer 1.18 more
of the cancels that make it exit (below).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from sqlalchemy.engine import Engine

from .drivers import Driver
from .drivers._base import CancelSender

# A CancelRequest is one packet on a new connection; this bounds a stalled network.
CANCEL_TIMEOUT_SECONDS = 0.5
# Through a transaction pooler the cancel waits for the pooler's own connection to
# the server. PgBouncer before 1.20 exits (FATAL "bad client state") when a cancel
# connection closes before it is done with it, so it gets longer there.
POOLER_CANCEL_TIMEOUT_SECONDS = 5.0
# Directly connected, the pauses before sending it again, in case it came too
# early: a backend stopped with the statement in its socket until 0.15 s after the
# cancellation ran all 20 s of it after one request (tests/faults/test_cancellation.py).
# A backend that has gone ignores the repeats, which name it by its process id and
# secret key. Short, as close() waits for them.
CANCEL_REPEAT_PAUSES_SECONDS = (0.1, 0.4)
# Sent in the background, so that no request waits for them; close() does.
_cancels: set[asyncio.Task[object]] = set()


def install_prompt_close(engine: Engine, driver: Driver, *, transaction_pooler: bool) -> None:
    """Close `engine`'s connections at once; cancel the work of busy ones."""
    dialect: Any = engine.dialect  # this engine's own dialect instance

    # The pool closes idle connections (recycle, dispose): an idle backend treats a
    # closed socket exactly like a goodbye message, so nothing is lost by not
    # waiting for the server to answer one.
    def close(dbapi_connection: Any) -> None:
        driver.cut(dbapi_connection.driver_connection)

    # It terminates connections it invalidates, which may be busy.
    def terminate(dbapi_connection: Any) -> None:
        connection = dbapi_connection.driver_connection
        send_cancel = _cancel_sender(driver, connection)
        if transaction_pooler and _loop_running():
            cancelling = _cancels_then_cut(send_cancel, driver, connection)
            run_in_background(bounded(cancelling, POOLER_CANCEL_TIMEOUT_SECONDS * 2))
            return
        driver.cut(connection)
        if send_cancel is not None:
            run_in_background(_cancel_repeatedly(send_cancel, CANCEL_TIMEOUT_SECONDS))

    dialect.do_close = close
    dialect.do_terminate = terminate


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False  # garbage collection outside the event loop: nothing can be sent
    return True


def _cancel_sender(driver: Driver, connection: Any) -> CancelSender | None:
    """What asks the server to stop `connection`'s statement; None if not needed."""
    if not _loop_running():
        return None
    if driver.is_closed(connection) or not driver.in_transaction(connection):
        # The socket is already gone (the backend has seen it too), or the backend
        # is idle: a recycled or discarded connection needs no cancel.
        return None
    return driver.cancel_sender(connection)


async def _cancels_then_cut(
    send_cancel: CancelSender | None, driver: Driver, connection: Any
) -> None:
    # The driver's own CancelRequests first (asyncpg sends one when a statement's task
    # is cancelled, and the cut would abandon it half-sent), then the package's.
    try:
        await driver.cancels_sent(connection, POOLER_CANCEL_TIMEOUT_SECONDS)
        if send_cancel is not None:
            await bounded(send_cancel(), POOLER_CANCEL_TIMEOUT_SECONDS)
    finally:
        driver.cut(connection)


async def _cancel_repeatedly(send_cancel: CancelSender, timeout: float) -> None:
    """Send a CancelRequest now and after each of CANCEL_REPEAT_PAUSES_SECONDS (bounded)."""
    sent = await bounded(send_cancel(), timeout)
    for pause in CANCEL_REPEAT_PAUSES_SECONDS:
        if not sent:
            return  # a network that did not carry it would not carry a repeat either
        await asyncio.sleep(pause)
        sent = await bounded(send_cancel(), timeout)


async def bounded(
    request: Coroutine[Any, Any, None], timeout: float = CANCEL_TIMEOUT_SECONDS
) -> bool:
    """Send a CancelRequest, waiting at most `timeout` seconds: whether it went; never raises."""
    # Best effort: if it fails, the statement runs to its end, as it would without it.
    try:
        await asyncio.wait_for(request, timeout)
    except Exception:
        return False
    return True


def run_in_background(cancelling: Coroutine[Any, Any, object]) -> None:
    """Run `cancelling` (bounded CancelRequests) without making anyone wait for it."""
    task = asyncio.get_running_loop().create_task(cancelling)
    _cancels.add(task)
    task.add_done_callback(_cancels.discard)


async def cancels_sent() -> None:
    """Wait for the CancelRequests of connections cut so far on this loop (bounded)."""
    loop = asyncio.get_running_loop()
    pending = [task for task in _cancels if task.get_loop() is loop]
    if pending:
        await asyncio.wait(pending)
