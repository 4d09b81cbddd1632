"""Test isolation on a real database: each test runs in one transaction, rolled back at its end.

While `isolated()` is active, every session the manager hands out (through
`session()`, `get_db` or `AsyncSessionDep`) joins that transaction through a
savepoint, so route code, CLI functions and background jobs are isolated alike,
and their `commit()` only releases a savepoint. Needs neither pytest nor FastAPI;
`pytest_plugin.py` wraps it in fixtures.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
from sqlalchemy.pool import NullPool

from ._manager import DatabaseSessionManager

__all__ = [
    "QueryCount",
    "TestDatabaseError",
    "count_queries",
    "create_test_database",
    "drop_test_database",
    "isolated",
    "joined_session",
    "share_session_with_app",
]

# Statements the isolation itself adds; they are not the code under test's queries.
_HARNESS_STATEMENT = re.compile(r"^\s*(SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT)\b", re.I)


class TestDatabaseError(RuntimeError):
    """The test database could not be created; the message says what to change."""


async def _on_maintenance_database(url: URL, statement: str) -> None:
    # CREATE/DROP DATABASE cannot run inside a transaction: AUTOCOMMIT, and a
    # one-off connection to the server's maintenance database.
    admin = create_async_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        async with admin.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await admin.dispose()


async def create_test_database(url: URL) -> None:
    """Create the (PostgreSQL) database `url` names; refuse one that exists already."""
    shown = url.render_as_string(hide_password=True)
    try:
        await _on_maintenance_database(url, f'CREATE DATABASE "{url.database}"')
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) == "42P04":  # duplicate_database
            raise TestDatabaseError(
                f"database {url.database!r} already exists and is not ours to reuse or "
                "drop: drop it yourself (a run that was killed leaves it behind), or "
                "name another one"
            ) from None
        raise TestDatabaseError(
            f"cannot create the test database at {shown}: {error.orig}"
        ) from None
    except OSError as error:
        raise TestDatabaseError(
            f"no PostgreSQL server answers for {shown} ({type(error).__name__}): start "
            "one, or set TEST_DATABASE_URL=postgresql+asyncpg://USER[:PASSWORD]@HOST:PORT/NAME "
            "to a server where USER may create databases"
        ) from None


async def drop_test_database(url: URL) -> None:
    """Drop the database `url` names, closing any connection still open to it."""
    await _on_maintenance_database(url, f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')


@asynccontextmanager
async def isolated(manager: DatabaseSessionManager) -> AsyncIterator[AsyncConnection]:
    """Open an outer transaction, join every session of `manager` to it, roll it back at exit.

    Yields the connection, for building extra sessions (`AsyncSession(bind=...,
    join_transaction_mode="create_savepoint")`) or counting queries.
    """
    async with manager.engine.connect() as connection:
        outer = await connection.begin()
        if connection.dialect.name == "postgresql":
            # Deferred constraints would only fire at the COMMIT that never comes:
            # check them per statement, so a violation cannot pass silently.
            await connection.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))
        try:
            with manager._sessions_joining(connection):
                yield connection
        finally:
            await outer.rollback()


def joined_session(connection: AsyncConnection) -> AsyncSession:
    """A new session inside the test's transaction, configured like the manager's."""
    return AsyncSession(
        bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint"
    )


def share_session_with_app(app: Any, session: AsyncSession) -> None:
    """Make every request of the FastAPI `app` use `session` itself.

    Routes then share the test's identity map. Like `get_db`, the override commits
    (releases the savepoint) when the route returns and rolls back when it raises.
    """
    from ._fastapi import get_db  # here, so that this module imports without FastAPI

    async def test_session() -> AsyncIterator[AsyncSession]:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()

    app.dependency_overrides[get_db] = test_session


@dataclass
class QueryCount:
    """The SQL statements run on a connection while `count_queries()` was active."""

    statements: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.statements)

    def __str__(self) -> str:
        listing = "".join(f"\n  {n}. {sql}" for n, sql in enumerate(self.statements, 1))
        return f"{self.count} statements:{listing}"


@contextmanager
def count_queries(connection: AsyncConnection) -> Iterator[QueryCount]:
    """Record the statements run on `connection`, leaving out the harness's savepoints.

    `assert queries.count == 2, queries` then catches an N+1 lazy load, and the
    failure message lists every statement.
    """
    seen = QueryCount()

    def record(*args: Any) -> None:
        statement: str = args[2]  # (conn, cursor, statement, parameters, context, many)
        if not _HARNESS_STATEMENT.match(statement):
            seen.statements.append(" ".join(statement.split()))

    target = connection.sync_connection
    assert target is not None, "count_queries() needs an open connection"
    event.listen(target, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(target, "before_cursor_execute", record)
