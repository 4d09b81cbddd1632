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
    _drain,
)
from app.models import Item
from tests.drivers import DRIVER, command_timeout_of
from tests.integration.failing_work import terminate_backend
from tests.integration.held_connection import holding_a_connection, until
from tests.postgres import checked_out, idle_in_transaction


def _connection_fates(manager: DatabaseSessionManager) -> list[str]:
    """What becomes of the engine's connections, in order: returned to the pool, or cut."""
    events: list[str] = []
    sync_engine = manager.engine.sync_engine
    event.listen(sync_engine, "checkin", lambda *_: events.append("connection returned"))
    event.listen(sync_engine, "invalidate", lambda *_: events.append("connection cut"))
    return events


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
    async with holding_a_connection(database_url) as holder:
        manager = holder.manager
        sync_engine = manager.engine.sync_engine
        events = _connection_fates(manager)
        called: set[str] = set()

        async def closer(name: str) -> None:
            called.add(name)
            try:
                await manager.close(grace=60)
            except asyncio.CancelledError:
                events.append(f"{name} cancelled")
                raise
            events.append(f"{name} returned")

        first = asyncio.create_task(closer("first close"))
        await until(holder.draining, "the first close() waiting for the unit of work")
        first_drain = set(manager._draining)
        if case == "reopened":
            manager.init(url=database_url)
        second = asyncio.create_task(closer("second close"))
        # Only the first's drain is left (the second's, of the reopened engine, is over):
        # the second close() is waiting for it, or has returned.
        await until(
            lambda: "second close" in called and manager._draining == first_drain,
            "the second close() waiting for the first's drain",
        )
        if case == "first-close-cancelled":
            first.cancel()
        else:
            holder.release()
        await asyncio.wait({first, second})
        until_closed = list(events)
        holder.release()
        outcomes = await asyncio.gather(holder.task, first, second, return_exceptions=True)

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


async def test_close_without_grace_cuts_a_connection_in_use_at_once(database_url: URL) -> None:
    """close(grace=0) waits for no unit of work: the connection one holds is cut at once
    (close() returns while the unit still holds it), and the unit's next statement fails."""
    async with holding_a_connection(
        database_url, then=lambda db: db.execute(text("SELECT 1"))
    ) as holder:
        events = _connection_fates(holder.manager)
        closing = asyncio.create_task(holder.manager.close(grace=0))
        # Not a measure of speed: a close() that waited for the unit would wait forever.
        done, _ = await asyncio.wait({closing}, timeout=10)
        until_closed = list(events)
        holder.release()
        outcomes = await asyncio.gather(holder.task, closing, return_exceptions=True)

    assert done == {closing}
    assert until_closed[:1] == ["connection cut"]
    assert isinstance(outcomes[0], Exception)


class _FrozenClock:
    """A monotonic clock that never moves: close()'s grace period never runs out."""

    @staticmethod
    def monotonic() -> float:
        return 1000.0


async def test_close_waits_out_a_grace_period_under_a_second(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close(grace=0.5) waits for a unit of work holding a connection: the whole grace, not
    a second less, so the unit ends on its own and its connection is returned, not cut."""
    monkeypatch.setattr(_drain, "time", _FrozenClock)
    async with holding_a_connection(
        database_url, then=lambda db: db.scalar(text("SELECT 2"))
    ) as holder:
        events = _connection_fates(holder.manager)
        closing = asyncio.create_task(holder.manager.close(grace=0.5))
        await until(holder.draining, "close() waiting for the unit")
        holder.release()
        outcomes = await asyncio.gather(holder.task, closing, return_exceptions=True)

    assert list(outcomes) == [2, None]
    assert events == ["connection returned"]


async def test_the_engine_opens_no_new_connection_while_it_is_closing(
    database_url: URL,
) -> None:
    """During close()'s grace period, code still holding the engine cannot open a new
    connection (it would outlive the pool being disposed): DatabaseNotInitializedError,
    raised before the service's own do_connect listeners run (they may connect)."""
    async with holding_a_connection(database_url) as holder:
        engine = holder.manager.engine
        connecting: list[str] = []  # listening from here: not the unit's own connection
        event.listen(engine.sync_engine, "do_connect", lambda *_: connecting.append("listener"))
        closing = asyncio.create_task(holder.manager.close(grace=60))
        await until(holder.draining, "close() waiting for the unit")
        try:
            with pytest.raises(DatabaseNotInitializedError):
                async with engine.connect() as connection:  # the only connection is in use
                    await connection.execute(text("SELECT 1"))
        finally:
            holder.release()
            await asyncio.gather(closing, return_exceptions=True)

    assert connecting == []


async def test_close_without_grace_does_not_wait_even_on_a_clock_that_stands_still(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close(grace=0) cuts a connection in use without one wait: no time left is no time,
    even when no time passes between the deadline and the check (a frozen clock)."""
    monkeypatch.setattr(_drain, "time", _FrozenClock)
    async with holding_a_connection(database_url) as holder:
        closing = asyncio.create_task(holder.manager.close(grace=0))
        # Not a measure of speed: a close() that waited here would wait forever.
        done, _ = await asyncio.wait({closing}, timeout=10)
        holder.release()
        await asyncio.gather(closing, return_exceptions=True)

    assert done == {closing}
