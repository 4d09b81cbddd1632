"""A cheap replacement for `pool_pre_ping` on asyncpg: prove a pooled connection alive.

SQLAlchemy's asyncpg ping is `BEGIN; ; ROLLBACK`, three round trips on every
checkout. This check costs nothing for a connection the server has visibly
closed (asyncpg saw the socket close), nothing for one returned to the pool
moments ago, and one round trip (a simple-protocol `SELECT 1`) otherwise.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.util import await_only

# A connection checked in this recently is taken as alive without a round trip:
# under load that is every checkout. Silent deaths (no FIN/RST reached us) within
# this window are not caught here; the request that meets one fails.
FRESH_SECONDS = 1.0
# The ping must not hang on a stalled network.
PING_TIMEOUT_SECONDS = 5.0
_LAST_CHECKIN = "app.database.last_checkin"


def install_liveness_check(engine: Engine) -> None:
    """Check each asyncpg connection on checkout, instead of `pool_pre_ping`."""
    event.listen(engine, "checkout", _ensure_alive)
    event.listen(engine, "checkin", _remember_checkin)


def _remember_checkin(_: Any, record: ConnectionPoolEntry) -> None:
    record.info[_LAST_CHECKIN] = time.monotonic()


def _ensure_alive(
    dbapi_connection: Any, record: ConnectionPoolEntry, _: PoolProxiedConnection
) -> None:
    driver_connection = dbapi_connection.driver_connection
    # Raising DisconnectionError makes the pool discard this connection and try
    # another (SQLAlchemy retries the checkout), so the request never sees it.
    if driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")
    checked_in = record.info.get(_LAST_CHECKIN)
    if checked_in is None or time.monotonic() - checked_in < FRESH_SECONDS:
        return  # new from connect(), or used moments ago
    try:
        # Not ";": asyncpg 0.32 fails on the empty query's missing command tag.
        await_only(driver_connection.execute("SELECT 1", timeout=PING_TIMEOUT_SECONDS))
    except Exception as error:
        raise DisconnectionError(f"ping failed: {type(error).__name__}") from error
