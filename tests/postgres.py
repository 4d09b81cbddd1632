"""Test-suite views of PostgreSQL from outside the code under test."""

from __future__ import annotations

import asyncio
import time

import asyncpg
from sqlalchemy.engine import URL
from sqlalchemy.pool import QueuePool

from app.database import DatabaseSessionManager


def asyncpg_dsn(url: URL, database: str | None = None) -> str:
    """A plain asyncpg DSN for `url`, optionally naming another database."""
    url = url.set(drivername="postgresql", database=database or url.database)
    return url.render_as_string(hide_password=False)


def checked_out(manager: DatabaseSessionManager) -> int:
    """How many of the manager's pooled connections are in use right now."""
    pool = manager.engine.pool
    assert isinstance(pool, QueuePool), f"expected a QueuePool, got {type(pool).__name__}"
    return pool.checkedout()


async def idle_in_transaction(observer: asyncpg.Connection) -> int:
    """Backends of the current database sitting inside a transaction with nothing to do."""
    count: int = await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
    )
    return count


async def count_backends(
    observer: asyncpg.Connection, application_name: str, *, state_like: str = "%"
) -> int:
    """Server processes whose connections carry `application_name`, by state pattern."""
    count: int = await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = $1 AND coalesce(state, '') LIKE $2",
        application_name,
        state_like,
    )
    return count


async def settled_backend_count(
    observer: asyncpg.Connection, application_name: str, expected: int, *, within: float = 5.0
) -> int:
    """`count_backends` once it equals `expected`, or as it stands after `within` seconds.

    A server process leaves pg_stat_activity a moment after its client closed the
    connection, so a count taken right after a close may still include it.
    """
    deadline = time.monotonic() + within
    while (count := await count_backends(observer, application_name)) != expected:
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.05)
    return count
