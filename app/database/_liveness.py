"""A cheap replacement for `pool_pre_ping`: prove a pooled connection alive.

SQLAlchemy's ping costs a round trip on every checkout (three on asyncpg,
which wraps it in BEGIN ... ROLLBACK). This check costs nothing for a connection
the driver has seen closed, nothing for one returned to the pool moments ago
with nothing unread from the server, and one round trip (a simple-protocol
`SELECT 1`) otherwise.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_only

from . import _signals as signals
from .drivers import driver_of

# A connection checked in this recently is taken as alive without a round trip:
# under load that is every checkout. Silent deaths (no FIN/RST reached us) within
# this window are not caught here; the request that meets one fails.
FRESH_SECONDS = 1.0
# The ping must not hang on a stalled network.
PING_TIMEOUT_SECONDS = 5.0
_LAST_CHECKIN = "app.database.last_checkin"


def install_liveness_check(engine: Engine) -> None:
    """Check each connection on checkout, instead of `pool_pre_ping`."""
    event.listen(engine, "checkout", _ensure_alive)
    event.listen(engine, "checkin", _remember_checkin)


def _remember_checkin(_: Any, record: ConnectionPoolEntry) -> None:
    record.info[_LAST_CHECKIN] = time.monotonic()


def _ensure_alive(
    dbapi_connection: Any, record: ConnectionPoolEntry, _: PoolProxiedConnection
) -> None:
    driver, connection = driver_of(record), dbapi_connection.driver_connection
    # Raising DisconnectionError makes the pool discard this connection and try
    # another (SQLAlchemy retries the checkout), so the request never sees it.
    if driver.is_closed(connection):
        if signals.liveness_checked:
            signals.liveness_checked(record, "closed")
        raise DisconnectionError("the server closed this pooled connection")
    checked_in = record.info.get(_LAST_CHECKIN)
    fresh = checked_in is None or time.monotonic() - checked_in < FRESH_SECONDS
    if fresh and not driver.has_pending_input(connection):
        return  # new from connect(), or used moments ago
    try:
        # Not ";": asyncpg 0.32 fails on the empty query's missing command tag.
        await_only(driver.run_simple(connection, "SELECT 1", PING_TIMEOUT_SECONDS))
    except Exception as error:
        if signals.liveness_checked:
            signals.liveness_checked(record, "ping_failed")
        raise DisconnectionError(f"ping failed: {type(error).__name__}") from error
    if signals.liveness_checked:
        signals.liveness_checked(record, "alive")
