"""The commit guard on Core use: `engine.begin()` and `connection.commit()`, no Session.

PostgreSQL answers COMMIT with a silent ROLLBACK once a statement of the
transaction failed. The session's own check (`before_commit`) never sees a
Core connection: what refuses that COMMIT here is the engine's "commit" listener
(`_guards.py`), which also ends the aborted transaction before the connection
goes back to the pool.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.database import DatabaseSessionManager, TransactionAbortedError
from tests.postgres import idle_in_transaction

INSERT = text("INSERT INTO items (name) VALUES (:name)")
FAILING = "SELECT 1/0"


async def _names(observer: asyncpg.Connection) -> list[str]:
    rows = await observer.fetch("SELECT name FROM items ORDER BY id")
    return [row["name"] for row in rows]


@pytest.fixture(name="engine")
async def engine_fixture(
    committed_db: DatabaseSessionManager, database_url: URL
) -> AsyncIterator[AsyncEngine]:
    """A manager's engine with one pooled connection, so a refused one is the next one used.

    `committed_db` removes the rows a test committed.
    """
    manager = DatabaseSessionManager()
    manager.init(url=database_url, pool_size=1, max_overflow=0)
    try:
        yield manager.engine
    finally:
        await manager.close()


async def _write_then_swallow_a_failure(connection: AsyncConnection, name: str) -> None:
    await connection.execute(INSERT, {"name": name})
    # The mistake under test: code that catches a database error and carries on.
    with contextlib.suppress(DBAPIError):
        await connection.execute(text(FAILING))


def _assert_caused_by_the_failed_statement(refusal: pytest.ExceptionInfo[BaseException]) -> None:
    cause = refusal.value.__cause__
    assert isinstance(cause, DBAPIError), f"cause is {cause!r}"
    assert cause.statement == FAILING


async def test_engine_begin_refuses_to_commit_after_a_caught_failure(
    engine: AsyncEngine, observer: asyncpg.Connection
) -> None:
    """`async with engine.begin()` whose block swallowed an error raises instead of losing data."""
    with pytest.raises(TransactionAbortedError, match=re.escape("begin_nested()")) as refusal:
        async with engine.begin() as connection:
            await _write_then_swallow_a_failure(connection, "lost")

    _assert_caused_by_the_failed_statement(refusal)
    assert await _names(observer) == []
    assert await idle_in_transaction(observer) == 0
    # The refused connection goes back to the pool with its aborted transaction ended.
    async with engine.begin() as connection:
        await connection.execute(INSERT, {"name": "next-unit"})
    assert await _names(observer) == ["next-unit"]


async def test_connection_commit_refuses_after_a_caught_failure(
    engine: AsyncEngine, observer: asyncpg.Connection
) -> None:
    """An explicit `await connection.commit()` is refused too, and the connection stays usable."""
    async with engine.connect() as connection:
        await _write_then_swallow_a_failure(connection, "lost")
        with pytest.raises(TransactionAbortedError) as refusal:
            await connection.commit()
        _assert_caused_by_the_failed_statement(refusal)
        assert await _names(observer) == []

        # As after any failed commit, SQLAlchemy wants rollback() before the next
        # transaction, which then starts clean and commits.
        await connection.rollback()
        await connection.execute(INSERT, {"name": "after-refusal"})
        await connection.commit()

    assert await _names(observer) == ["after-refusal"]
    assert await idle_in_transaction(observer) == 0


async def test_a_failure_rolled_back_to_its_savepoint_does_not_block_the_commit(
    engine: AsyncEngine, observer: asyncpg.Connection
) -> None:
    """The README's way to let a statement fail on Core: `begin_nested()`, then COMMIT as usual."""
    async with engine.begin() as connection:
        await connection.execute(INSERT, {"name": "kept"})
        with contextlib.suppress(DBAPIError):
            async with connection.begin_nested():
                await connection.execute(text(FAILING))

    assert await _names(observer) == ["kept"]
