"""Test-suite access to PostgreSQL: which server, and databases the suite owns."""

from __future__ import annotations

import os

import asyncpg
import pytest
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import QueuePool

from app.database import DatabaseSessionManager

DEFAULT_TEST_DATABASE_URL = (
    f"postgresql+asyncpg://postgres@127.0.0.1:5432/app_database_test_{os.getpid()}"
)


def url_under_test() -> URL:
    """`TEST_DATABASE_URL`, or a per-process database on the local server."""
    return make_url(os.environ.get("TEST_DATABASE_URL") or DEFAULT_TEST_DATABASE_URL)


def asyncpg_dsn(url: URL, database: str | None = None) -> str:
    """A plain asyncpg DSN for `url`, optionally naming another database."""
    url = url.set(drivername="postgresql", database=database or url.database)
    return url.render_as_string(hide_password=False)


async def admin_connection(url: URL) -> asyncpg.Connection:
    """A connection to the server's maintenance database; stops the run if none answers."""
    try:
        return await asyncpg.connect(asyncpg_dsn(url, "postgres"), timeout=5)
    except (OSError, asyncpg.PostgresError) as error:
        shown = url.render_as_string(hide_password=True)
        pytest.exit(
            f"no PostgreSQL server answers for {shown} ({type(error).__name__}). Start one, "
            "or set TEST_DATABASE_URL=postgresql+asyncpg://USER[:PASSWORD]@HOST:PORT/DBNAME "
            "to a server where USER may create and drop DBNAME.",
            returncode=3,
        )


async def create_database(url: URL, name: str) -> None:
    """Create database `name`; refuse to reuse one that exists, since we do not own it."""
    admin = await admin_connection(url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    except asyncpg.DuplicateDatabaseError:
        pytest.exit(
            f"database {name!r} already exists and the test suite only drops databases "
            "it created: drop it yourself, or name another in TEST_DATABASE_URL",
            returncode=3,
        )
    finally:
        await admin.close()


async def drop_database(url: URL, name: str) -> None:
    admin = await admin_connection(url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


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
