"""`session_manager.session()` on real PostgreSQL: commits are real, failures leave nothing."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from app.database import (
    DatabaseNotInitializedError,
    DatabaseSessionManager,
    TransactionAbortedError,
)
from app.models import Item
from tests.drivers import DRIVER, command_timeout_of
from tests.integration.failing_work import terminate_backend
from tests.postgres import checked_out, idle_in_transaction


async def _names(observer: asyncpg.Connection) -> list[str]:
    rows = await observer.fetch("SELECT name FROM items ORDER BY id")
    return [row["name"] for row in rows]


async def test_batch_write_without_commit_call_persists(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """The seed's batch example never calls commit(): the write is still committed."""
    async with committed_db.session() as db:
        db.add(Item(name="batch"))

    assert await _names(observer) == ["batch"]


async def test_work_after_an_explicit_commit_is_committed_too(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """Writes made after an explicit commit() inside the block are not dropped."""
    async with committed_db.session() as db:
        db.add(Item(name="first"))
        await db.commit()
        db.add(Item(name="second"))

    assert await _names(observer) == ["first", "second"]


async def test_exception_rolls_back_and_propagates(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """An exception in the block rolls the unit of work back and is re-raised."""
    with pytest.raises(LookupError, match="boom"):
        async with committed_db.session() as db:
            db.add(Item(name="doomed"))
            await db.flush()
            raise LookupError("boom")

    assert await _names(observer) == []
    assert checked_out(committed_db) == 0


async def test_cancellation_rolls_back_and_returns_the_connection(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """A task cancelled mid-unit-of-work writes nothing and leaves no open transaction."""
    flushed = asyncio.Event()

    async def unit_of_work() -> None:
        async with committed_db.session() as db:
            db.add(Item(name="cancelled"))
            await db.flush()
            flushed.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(unit_of_work())
    await flushed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert await _names(observer) == []
    assert checked_out(committed_db) == 0
    assert await idle_in_transaction(observer) == 0


async def test_failed_statement_fails_the_unit_of_work(
    committed_db: DatabaseSessionManager, database_url: URL, observer: asyncpg.Connection
) -> None:
    """A swallowed database error cannot end in a silent commit of nothing."""
    # One pooled connection, so the next unit of work reuses the refused one.
    manager = DatabaseSessionManager()
    manager.init(url=database_url, pool_size=1, max_overflow=0)
    try:
        with pytest.raises(TransactionAbortedError, match=re.escape("begin_nested()")):
            async with manager.session() as db:
                db.add(Item(name="before-error"))
                await db.flush()
                # The mistake under test: route code swallowing a database error.
                with contextlib.suppress(DBAPIError):
                    await db.execute(text("SELECT 1/0"))

        assert await _names(observer) == []
        assert await idle_in_transaction(observer) == 0
        # The refused commit must not hand an aborted transaction to the next user.
        async with manager.session() as db:
            db.add(Item(name="next-unit"))
        assert await _names(observer) == ["next-unit"]
    finally:
        await manager.close()


@pytest.mark.parametrize("end", ["rolled-back", "connection-lost"])
async def test_a_caught_failure_is_not_kept_past_its_transaction(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection, end: str
) -> None:
    """The remembered first failure (and its traceback's frames) goes when the transaction does.

    At its ROLLBACK, or when its connection is lost: not only at the pooled
    connection's next BEGIN, so it does not rest in the pool.
    """
    with pytest.raises((LookupError, DBAPIError)):
        async with committed_db.session() as db:
            info: dict[Any, Any] = (await db.connection()).info
            pid = await db.scalar(text("SELECT pg_backend_pid()"))
            before = set(info)
            with contextlib.suppress(DBAPIError):
                await db.execute(text("SELECT 1/0"))
            remembered = set(info) - before
            assert remembered, "the commit guard remembers the failure in the connection's info"
            if end == "connection-lost":
                await terminate_backend(observer, pid)
                await db.execute(text("SELECT 1"))
            raise LookupError("the code gives up")

    assert checked_out(committed_db) == 0
    assert remembered.isdisjoint(info), {key: info[key] for key in remembered & set(info)}


# A statement the driver refuses before sending anything: asyncpg cannot encode 'abc'
# as the integer its prepared statement asks for; psycopg cannot send a NUL byte.
CLIENT_SIDE_FAILURE = (
    (text("SELECT CAST(:value AS integer)"), {"value": "abc"})
    if DRIVER == "asyncpg"
    else (text("SELECT CAST(:value AS text)"), {"value": "a\x00b"})
)


async def test_an_error_the_driver_raised_before_sending_leaves_the_transaction_usable(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """Only an error the server sent aborts the transaction: the commit guard lets this commit."""
    async with committed_db.session() as db:
        db.add(Item(name="before-client-error"))
        await db.flush()
        with pytest.raises(DBAPIError):
            await db.execute(*CLIENT_SIDE_FAILURE)
        db.add(Item(name="after-client-error"))

    assert await _names(observer) == ["before-client-error", "after-client-error"]


async def test_statement_parameters_stay_out_of_errors(
    committed_db: DatabaseSessionManager,
) -> None:
    """With the default hide_parameters=True SQLAlchemy does not print a statement's values.

    (Driver and server messages can still quote a value themselves, e.g. asyncpg's
    "invalid input for query argument": the package README says so.)
    """
    canary = "parameter-canary-5d1e"

    with pytest.raises(DBAPIError) as caught:
        async with committed_db.session() as db:
            await db.execute(text("SELECT 1/0 WHERE :value <> ''"), {"value": canary})

    assert "hidden due to hide_parameters" in str(caught.value)
    assert canary not in str(caught.value)


async def test_close_refuses_new_sessions_and_init_reopens(database_url: URL) -> None:
    """After close() session() fails clearly; init() then opens a working engine again."""
    manager = DatabaseSessionManager()
    manager.init(url=database_url)
    async with manager.session() as db:
        assert await db.scalar(select(1)) == 1
    await manager.close()

    with pytest.raises(DatabaseNotInitializedError, match="is closed"):
        async with manager.session():
            pass

    manager.init(url=database_url)
    try:
        async with manager.session() as db:
            assert await db.scalar(select(1)) == 1
    finally:
        await manager.close()


@pytest.mark.parametrize("case", ["work-finishes", "first-close-cancelled", "reopened"])
async def test_concurrent_close_calls_return_only_once_the_drain_is_done(
    database_url: URL, case: str
) -> None:
    """A second close() (a signal handler's and the lifespan's) waits for the first's drain.

    Whether the unit of work holding a connection finishes, or the first close() is
    cancelled (its connection is then cut), or the manager was reopened in between:
    every call returns only once that connection is back or cut and the engine is gone.
    """
    manager = DatabaseSessionManager()
    manager.init(url=database_url)
    events: list[str] = []
    sync_engine = manager.engine.sync_engine
    event.listen(sync_engine, "checkin", lambda *_: events.append("connection returned"))
    event.listen(sync_engine, "invalidate", lambda *_: events.append("connection cut"))
    holding, release = asyncio.Event(), asyncio.Event()

    async def unit_of_work() -> None:
        async with manager.session() as db:
            await db.execute(text("SELECT 1"))
            holding.set()
            await release.wait()

    async def closer(name: str) -> None:
        try:
            await manager.close(grace=60)
        except asyncio.CancelledError:
            events.append(f"{name} cancelled")
            raise
        events.append(f"{name} returned")

    work = asyncio.create_task(unit_of_work())
    await holding.wait()
    first = asyncio.create_task(closer("first close"))
    await asyncio.sleep(0)  # the first close() is now waiting for the unit of work
    if case == "reopened":
        manager.init(url=database_url)
    second = asyncio.create_task(closer("second close"))
    await asyncio.sleep(0)  # the second has run up to its first wait, or returned
    if case == "first-close-cancelled":
        first.cancel()
    else:
        release.set()
    await asyncio.wait({first, second})
    until_closed = list(events)
    release.set()
    outcomes = await asyncio.gather(work, first, second, return_exceptions=True)

    if case == "first-close-cancelled":
        assert until_closed == ["connection cut", "first close cancelled", "second close returned"]
        assert isinstance(outcomes[1], asyncio.CancelledError)
    else:
        assert until_closed == [
            "connection returned",
            "first close returned",
            "second close returned",
        ]
        assert list(outcomes) == [None, None, None]
    assert sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    with pytest.raises(DatabaseNotInitializedError):
        _ = manager.engine


async def test_error_healed_by_a_savepoint_still_commits(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """A failure rolled back to its savepoint leaves the rest of the work committable."""
    async with committed_db.session() as db:
        db.add(Item(name="kept"))
        await db.flush()
        # The documented recovery: the savepoint absorbs the failure.
        with contextlib.suppress(DBAPIError):
            async with db.begin_nested():
                await db.execute(text("SELECT 1/0"))

    assert await _names(observer) == ["kept"]


# The timeouts the README says the URL's query may carry, per driver.
URL_TIMEOUTS = (
    {"timeout": "9", "command_timeout": "7"} if DRIVER == "asyncpg" else {"connect_timeout": "9"}
)


async def test_timeouts_in_the_url_query_connect(database_url: URL) -> None:
    """?timeout=9 arrives as a string; the connection still opens and runs with it."""
    manager = DatabaseSessionManager()
    manager.init(url=database_url.update_query_dict(URL_TIMEOUTS))
    try:
        async with manager.session() as db:
            assert await db.scalar(text("SELECT 1")) == 1
            raw = await (await db.connection()).get_raw_connection()
            if DRIVER == "asyncpg":
                assert command_timeout_of(raw.driver_connection) == 7.0
    finally:
        await manager.close()


async def test_a_caught_failure_of_the_apps_own_prepared_statement_still_fails_the_commit(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """EXECUTE of an unknown statement is the app's error, not a pooler's: the guard refuses."""
    with pytest.raises(TransactionAbortedError):
        async with committed_db.session() as db:
            db.add(Item(name="lost-with-the-transaction"))
            await db.flush()
            with pytest.raises(DBAPIError):  # not TransactionPoolerError
                await db.execute(text("EXECUTE no_such_statement"))

    assert await _names(observer) == []
