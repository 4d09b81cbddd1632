"""Bounded waits on asyncpg: no request or shutdown waits on a dead network for long.

asyncpg raises a bare `TimeoutError` when `command_timeout` expires, which
SQLAlchemy neither wraps nor treats as a lost connection: the session's ROLLBACK
would then wait a second `command_timeout` on the same silent socket, and the
connection would go back to the pool to fail the next request too. And closing a
connection waits for the server's goodbye, up to `command_timeout` per
connection when the network is stalled.
"""

from __future__ import annotations

from typing import Any

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
    dialect.do_terminate = _abort


def _timeout_means_lost_connection(context: ExceptionContext) -> None:
    if isinstance(context.original_exception, TimeoutError):
        # The server never answered in time: whether the connection still works is
        # unknown, so it is invalidated (closed, never reused) instead of rolled back.
        context.is_disconnect = True


def _abort(dbapi_connection: Any) -> None:
    dbapi_connection.driver_connection.terminate()
