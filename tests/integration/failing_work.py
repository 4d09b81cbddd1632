"""Units of work that fail on real PostgreSQL in each way `classify_error` knows.

Shared by the exception-level tests and the HTTP-level ones, on tables of their own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import DatabaseSessionManager
from tests.drivers import application_name as named
from tests.postgres import checked_out

SCHEMA = """
CREATE TABLE errors_parent (id int PRIMARY KEY, n int NOT NULL);
CREATE TABLE errors_child (id int PRIMARY KEY, parent_id int REFERENCES errors_parent (id));
CREATE TABLE errors_deferred_child (
    id int PRIMARY KEY,
    parent_id int REFERENCES errors_parent (id) DEFERRABLE INITIALLY DEFERRED
);
INSERT INTO errors_parent VALUES (1, 0), (2, 0);
"""
DROP = "DROP TABLE IF EXISTS errors_child, errors_deferred_child, errors_parent;"

# Short, so that the failures under test come quickly; PostgreSQL's own defaults
# (deadlock_timeout 1 s) would only make the suite slower.
SHORT_TIMEOUT = "100ms"


@asynccontextmanager
async def error_tables(observer: asyncpg.Connection) -> AsyncIterator[None]:
    """The tables the failing units of work use, dropped afterwards."""
    await observer.execute(DROP + SCHEMA)
    try:
        yield
    finally:
        await observer.execute(DROP)


@asynccontextmanager
async def private_manager(
    url: URL | str, application_name: str, **engine_kwargs: Any
) -> AsyncIterator[DatabaseSessionManager]:
    """A manager of the test's own, its backends named `application_name`."""
    manager = DatabaseSessionManager()
    connect_args = {
        **engine_kwargs.pop("connect_args", {}),
        **named(application_name),
    }
    manager.init(url=url, connect_args=connect_args, **engine_kwargs)
    try:
        yield manager
    finally:
        await manager.close()


@asynccontextmanager
async def manager_on_error_tables(
    url: URL, observer: asyncpg.Connection, application_name: str, **engine_kwargs: Any
) -> AsyncIterator[DatabaseSessionManager]:
    """A manager of the test's own, on fresh error tables; it commits for real.

    A unit of work that keeps its connection after the block fails the test.
    """
    async with (
        error_tables(observer),
        private_manager(url, application_name, **engine_kwargs) as manager,
    ):
        yield manager
        assert checked_out(manager) == 0, "a unit of work kept its connection"


class Rendezvous:
    """Two concurrent units of work wait for each other at one point."""

    def __init__(self) -> None:
        self._arrived = 0
        self._both = asyncio.Event()

    async def meet(self) -> None:
        self._arrived += 1
        if self._arrived == 2:
            self._both.set()
        await self._both.wait()


async def insert_duplicate(db: AsyncSession) -> None:
    """A unique violation (23505): row 1 exists."""
    await db.execute(text("INSERT INTO errors_parent VALUES (1, 0)"))


async def insert_orphan(db: AsyncSession) -> None:
    """A foreign key violation (23503) at the INSERT."""
    await db.execute(text("INSERT INTO errors_child VALUES (1, 99)"))


async def insert_orphan_checked_at_commit(db: AsyncSession) -> None:
    """A foreign key violation (23503) that only COMMIT reports: the key is deferred."""
    await db.execute(text("INSERT INTO errors_deferred_child VALUES (1, 99)"))


async def insert_null(db: AsyncSession) -> None:
    """A not-null violation (23502): the application's own bug, not a conflict."""
    await db.execute(text("INSERT INTO errors_parent VALUES (3, NULL)"))


async def write_skew(db: AsyncSession, rendezvous: Rendezvous, row: int) -> None:
    """Half of a write skew under SERIALIZABLE: both read both rows, each writes one (40001)."""
    await db.execute(text("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"))
    await db.execute(text("SELECT sum(n) FROM errors_parent"))
    await rendezvous.meet()
    await db.execute(text("UPDATE errors_parent SET n = n + 1 WHERE id = :row"), {"row": row})


async def lock_rows_in_order(
    db: AsyncSession, rendezvous: Rendezvous, first: int, second: int
) -> None:
    """Half of a deadlock (40P01): lock `first`, wait for the other side, then lock `second`."""
    await db.execute(text(f"SET LOCAL deadlock_timeout = '{SHORT_TIMEOUT}'"))
    await db.execute(text("UPDATE errors_parent SET n = n WHERE id = :id"), {"id": first})
    await rendezvous.meet()
    await db.execute(text("UPDATE errors_parent SET n = n WHERE id = :id"), {"id": second})


async def sleep_past_statement_timeout(db: AsyncSession) -> None:
    """A statement the server cancels at its statement_timeout (57014)."""
    await db.execute(text(f"SET LOCAL statement_timeout = '{SHORT_TIMEOUT}'"))
    await db.execute(text("SELECT pg_sleep(5)"))


async def hold_row_lock(db: AsyncSession, locked: asyncio.Event, release: asyncio.Event) -> None:
    """Lock row 1 until `release` is set."""
    await db.execute(text("SELECT id FROM errors_parent WHERE id = 1 FOR UPDATE"))
    locked.set()
    await release.wait()


@asynccontextmanager
async def connection_held(manager: DatabaseSessionManager) -> AsyncIterator[None]:
    """Another unit of work holds one of `manager`'s connections until the block ends."""
    held, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with manager.session() as db:
            await db.execute(text("SELECT 1"))
            held.set()
            await release.wait()

    holding = asyncio.create_task(holder())
    await held.wait()
    try:
        yield
    finally:
        release.set()
        await holding


async def wait_past_lock_timeout(db: AsyncSession) -> None:
    """An UPDATE of a locked row that gives up at its lock_timeout (55P03)."""
    await db.execute(text(f"SET LOCAL lock_timeout = '{SHORT_TIMEOUT}'"))
    await db.execute(text("UPDATE errors_parent SET n = n WHERE id = 1"))


async def sleep(db: AsyncSession, seconds: float) -> None:
    """Hold the session's connection for `seconds`, inside the database."""
    await db.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})


async def write_in_read_only_transaction(db: AsyncSession) -> None:
    """A write in a read-only transaction (25006), as on a primary demoted by failover."""
    await db.execute(text("SET TRANSACTION READ ONLY"))
    await db.execute(text("INSERT INTO errors_parent VALUES (3, 0)"))


async def lose_connection_mid_transaction(
    db: AsyncSession, terminate: Callable[[int], Any]
) -> None:
    """The server ends the session's backend between two statements of its transaction."""
    pid = await db.scalar(text("SELECT pg_backend_pid()"))
    assert isinstance(pid, int)
    await terminate(pid)
    await db.execute(text("SELECT 1"))


async def terminate_backend(observer: asyncpg.Connection, pid: int) -> None:
    """End backend `pid` and wait until it is gone."""
    await observer.execute("SELECT pg_terminate_backend($1)", pid)
    for _ in range(500):  # backends exit asynchronously: up to 5 s
        if not await observer.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"backend {pid} still running 5 s after pg_terminate_backend")
