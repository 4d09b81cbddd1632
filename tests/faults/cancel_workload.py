"""What the cancellation driver runs: a unit of work that writes a pair of rows around a slow
statement and a slow COMMIT, the table it writes to, and the small pool it runs on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.database import DatabaseSessionManager
from tests.drivers import application_name as named
from tests.faults.cancel_phases import Iteration

POOL_CAPACITY = 4
POOL_TIMEOUT_SECONDS = 5.0  # a lost pool slot fails a checkout in 5 s instead of hanging
STATEMENT_SECONDS = 0.05  # the running statement: SELECT pg_sleep(...)
BETWEEN_SECONDS = 0.002  # application code between two statements
COMMIT_SECONDS = 0.02  # what the deferred trigger adds to COMMIT

TABLE = "h2_cancel_pairs"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    style text NOT NULL,
    iteration int NOT NULL,
    part smallint NOT NULL,
    PRIMARY KEY (style, iteration, part)
);
CREATE OR REPLACE FUNCTION h2_cancel_slow_commit() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_sleep({COMMIT_SECONDS}); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS h2_cancel_slow_commit ON {TABLE};
CREATE CONSTRAINT TRIGGER h2_cancel_slow_commit AFTER INSERT ON {TABLE}
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.part = 2)
    EXECUTE FUNCTION h2_cancel_slow_commit();
"""
DROP_SCHEMA = f"""
DROP TABLE IF EXISTS {TABLE};
DROP FUNCTION IF EXISTS h2_cancel_slow_commit();
"""
INSERT = text(f"INSERT INTO {TABLE} (style, iteration, part) VALUES (:style, :iteration, :part)")


class AppError(Exception):
    """Raised by a unit of work after its writes, so that its cleanup has to roll back."""


async def write_pair(session: AsyncSession, iteration: Iteration) -> None:
    """Two rows in two statements around a running one: half of it must never commit."""
    values = {"style": iteration.style, "iteration": iteration.number}
    await session.execute(INSERT, {**values, "part": 1})
    await asyncio.sleep(BETWEEN_SECONDS)
    await session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": STATEMENT_SECONDS})
    await session.execute(INSERT, {**values, "part": 2})
    if iteration.fail:
        raise AppError("refused after writing")


async def _execute(dsn: str, sql: str) -> None:
    # asyncpg directly: the schema is set up outside the code under test.
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def create_schema(dsn: str) -> None:
    """Create the pairs table and its slow deferred trigger."""
    await _execute(dsn, SCHEMA)


async def drop_schema(dsn: str) -> None:
    """Drop what `create_schema` made."""
    await _execute(dsn, DROP_SCHEMA)


def open_manager(
    url: URL, application_name: str, *, transaction_pooler: bool = False
) -> DatabaseSessionManager:
    """A manager of the run's own: small pool, bounded waits, its own application_name."""
    manager = DatabaseSessionManager()
    manager.init(
        url,
        transaction_pooler=transaction_pooler,
        pool_size=POOL_CAPACITY,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        connect_args=named(application_name),
    )
    return manager


@contextlib.asynccontextmanager
async def connections_held(engine: AsyncEngine, count: int) -> AsyncIterator[asyncio.Event]:
    """Check out `count` connections at once, until the yielded event is set or the block ends.

    The block starts only once all `count` are out, so entering it proves the pool
    could hand out that many at the same time; a checkout that fails is raised.
    """
    held = 0
    all_held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        nonlocal held
        async with engine.connect():
            held += 1
            if held == count:
                all_held.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(count)]
    all_in = asyncio.create_task(all_held.wait())
    try:
        # Holders only end once released: one that ends first failed its checkout (a
        # pool timeout, if a slot was lost), and waiting for the others would hang.
        await asyncio.wait([all_in, *holders], return_when=asyncio.FIRST_COMPLETED)
        if all_held.is_set():
            yield release
    finally:
        all_in.cancel()
        release.set()
        await asyncio.gather(*holders)  # raises the failed checkout's error, if any
