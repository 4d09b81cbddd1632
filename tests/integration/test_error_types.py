"""Each kind of database failure, provoked on real PostgreSQL, is classified as its kind.

The units of work commit for real (no rollback fixture): several failures only
happen at COMMIT, or between two connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import asyncpg
import pytest
from sqlalchemy import exc, select, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import (
    DatabaseErrorKind,
    DatabaseSessionManager,
    PoolExhaustedError,
    TransactionAbortedError,
    classify_error,
)
from app.database._classify import failed_to_connect
from app.models import Item
from tests.drivers import DRIVER, DRIVERNAME
from tests.integration.failing_work import (
    Rendezvous,
    connection_held,
    hold_row_lock,
    insert_duplicate,
    insert_null,
    insert_orphan,
    insert_orphan_checked_at_commit,
    lock_rows_in_order,
    lose_connection_mid_transaction,
    manager_on_error_tables,
    private_manager,
    sleep,
    sleep_past_statement_timeout,
    terminate_backend,
    wait_past_lock_timeout,
    write_in_read_only_transaction,
    write_skew,
)
from tests.postgres import checked_out

APPLICATION_NAME = "h1_errors_types"
POOL_TIMEOUT = 0.2


@pytest.fixture(name="manager")
async def manager_fixture(
    database_url: URL, observer: asyncpg.Connection
) -> AsyncIterator[DatabaseSessionManager]:
    """A manager of this module's own, on the error tables, that commits for real."""
    async with manager_on_error_tables(database_url, observer, APPLICATION_NAME) as manager:
        yield manager


async def _failure_of(
    manager: DatabaseSessionManager, work: Callable[[AsyncSession], Awaitable[None]]
) -> BaseException:
    """What one unit of work running `work` raises at its block's exit."""
    try:
        async with manager.session() as db:
            await work(db)
    except Exception as error:
        return error
    raise AssertionError("the unit of work did not fail")


async def _one_of_two_fails(
    manager: DatabaseSessionManager, work: Callable[[AsyncSession, Rendezvous], Awaitable[None]]
) -> BaseException:
    """Runs two units of work that meet halfway; exactly one must fail, and is returned."""
    rendezvous = Rendezvous()

    async def unit() -> None:
        async with manager.session() as db:
            await work(db, rendezvous)

    outcomes = await asyncio.gather(unit(), unit(), return_exceptions=True)
    failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
    assert len(failures) == 1, outcomes
    return failures[0]


async def test_unique_violation_is_a_conflict(manager: DatabaseSessionManager) -> None:
    """A duplicate key (23505) is an IntegrityError classified CONFLICT."""
    error = await _failure_of(manager, insert_duplicate)

    assert isinstance(error, exc.IntegrityError)
    assert classify_error(error) is DatabaseErrorKind.CONFLICT


async def test_foreign_key_violation_is_a_conflict(manager: DatabaseSessionManager) -> None:
    """A missing parent (23503) is an IntegrityError classified CONFLICT."""
    error = await _failure_of(manager, insert_orphan)

    assert isinstance(error, exc.IntegrityError)
    assert classify_error(error) is DatabaseErrorKind.CONFLICT


async def test_violation_reported_at_commit_is_a_conflict(manager: DatabaseSessionManager) -> None:
    """A deferred foreign key failing at the unit of work's COMMIT is classified CONFLICT."""
    error = await _failure_of(manager, insert_orphan_checked_at_commit)

    assert isinstance(error, exc.IntegrityError)
    assert classify_error(error) is DatabaseErrorKind.CONFLICT


@pytest.mark.parametrize("through", ["session", "connection"])
async def test_a_caught_conflict_is_the_cause_of_the_refused_commit(
    manager: DatabaseSessionManager, through: str
) -> None:
    """A swallowed unique violation fails the COMMIT: its cause, named and classified, is kept.

    The first failure is the cause, not a later statement's "transaction is aborted";
    it names the statement (not its parameters), so the kind is still CONFLICT.
    """

    async def swallow(execute: Callable[..., Awaitable[object]]) -> None:
        # The mistake under test: code catching database errors and carrying on.
        with contextlib.suppress(exc.DBAPIError):
            await execute(text("INSERT INTO errors_parent VALUES (:id, 0)"), {"id": 1})
        with contextlib.suppress(exc.DBAPIError):
            await execute(text("SELECT 1"))

    with pytest.raises(TransactionAbortedError, match=re.escape("begin_nested()")) as raised:
        if through == "session":
            async with manager.session() as db:
                await swallow(db.execute)
        else:  # the engine-level guard, for connections used without a session
            async with manager.engine.begin() as connection:
                await swallow(connection.execute)

    cause = raised.value.__cause__
    assert isinstance(cause, exc.IntegrityError), repr(cause)
    assert "INSERT INTO errors_parent VALUES (" in str(cause)
    assert "hidden due to hide_parameters" in str(cause)
    assert classify_error(raised.value) is DatabaseErrorKind.CONFLICT


async def test_not_null_violation_is_left_unclassified(manager: DatabaseSessionManager) -> None:
    """A NULL where the schema forbids one is the application's bug: no kind, so a 500."""
    error = await _failure_of(manager, insert_null)

    assert isinstance(error, exc.IntegrityError)
    assert classify_error(error) is None
    assert not failed_to_connect(error)  # a statement's failure, on a connection that works


async def test_serialization_failure_is_retryable(manager: DatabaseSessionManager) -> None:
    """Of two SERIALIZABLE units of work in a write skew, one fails (40001), RETRYABLE."""
    rows = iter((1, 2))
    error = await _one_of_two_fails(
        manager, lambda db, rendezvous: write_skew(db, rendezvous, next(rows))
    )

    assert isinstance(error, exc.DBAPIError)
    assert re.search("could not serialize access", str(error)), error
    assert classify_error(error) is DatabaseErrorKind.RETRYABLE


async def test_deadlock_is_retryable(manager: DatabaseSessionManager) -> None:
    """Two units of work locking two rows in opposite orders: one deadlocks (40P01), RETRYABLE."""
    orders = iter(((1, 2), (2, 1)))
    error = await _one_of_two_fails(
        manager, lambda db, rendezvous: lock_rows_in_order(db, rendezvous, *next(orders))
    )

    assert isinstance(error, exc.DBAPIError)
    assert re.search("deadlock detected", str(error)), error
    assert classify_error(error) is DatabaseErrorKind.RETRYABLE


async def test_statement_timeout_is_a_timeout(manager: DatabaseSessionManager) -> None:
    """A statement cancelled by the server's statement_timeout (57014) is classified TIMEOUT."""
    error = await _failure_of(manager, sleep_past_statement_timeout)

    assert isinstance(error, exc.DBAPIError)
    assert re.search("canceling statement due to statement timeout", str(error)), error
    assert classify_error(error) is DatabaseErrorKind.TIMEOUT


async def test_lock_timeout_is_a_timeout(manager: DatabaseSessionManager) -> None:
    """An UPDATE giving up on a locked row at its lock_timeout (55P03) is classified TIMEOUT."""
    locked, release = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with manager.session() as db:
            await hold_row_lock(db, locked, release)

    holding = asyncio.create_task(holder())
    await locked.wait()
    try:
        error = await _failure_of(manager, wait_past_lock_timeout)
    finally:
        release.set()
        await holding

    assert isinstance(error, exc.DBAPIError)
    assert re.search("canceling statement due to lock timeout", str(error)), error
    assert classify_error(error) is DatabaseErrorKind.TIMEOUT


async def test_client_command_timeout_is_a_timeout(database_url: URL) -> None:
    """The driver's command_timeout (asyncpg's, raised unwrapped as TimeoutError) is TIMEOUT."""
    async with private_manager(
        database_url, APPLICATION_NAME, connect_args={"command_timeout": 0.2}
    ) as manager:
        error = await _failure_of(manager, partial(sleep, seconds=5))

    assert isinstance(error, TimeoutError if DRIVER == "asyncpg" else exc.OperationalError)
    assert classify_error(error) is DatabaseErrorKind.TIMEOUT


async def test_write_in_read_only_transaction_is_unavailable(
    manager: DatabaseSessionManager,
) -> None:
    """A write refused as read-only (25006), what a demoted primary answers, is UNAVAILABLE."""
    error = await _failure_of(manager, write_in_read_only_transaction)

    assert isinstance(error, exc.DBAPIError)
    assert re.search("read-only transaction", str(error)), error
    assert classify_error(error) is DatabaseErrorKind.UNAVAILABLE


async def test_connection_lost_mid_transaction_is_unavailable(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """A backend ended by the server inside a transaction surfaces as UNAVAILABLE."""
    terminate = partial(terminate_backend, observer)
    error = await _failure_of(
        manager, partial(lose_connection_mid_transaction, terminate=terminate)
    )

    assert isinstance(error, exc.DBAPIError)
    assert error.connection_invalidated
    assert classify_error(error) is DatabaseErrorKind.UNAVAILABLE


async def test_refused_connection_is_unavailable() -> None:
    """Nothing listening at the address (asyncpg: a bare ConnectionRefusedError) is UNAVAILABLE."""
    async with private_manager(f"{DRIVERNAME}://postgres@127.0.0.1:1/none", "unused") as man:
        error = await _failure_of(man, partial(sleep, seconds=0))

    assert isinstance(error, ConnectionRefusedError if DRIVER == "asyncpg" else exc.DBAPIError)
    assert classify_error(error) is DatabaseErrorKind.UNAVAILABLE
    assert failed_to_connect(error)


@asynccontextmanager
async def _silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers; yields the port."""
    release = asyncio.Event()

    async def stay_silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server = await asyncio.start_server(stay_silent, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        release.set()
        server.close()
        await server.wait_closed()


async def test_connect_timeout_is_unavailable() -> None:
    """A server that accepts but never answers: the connect timeout is UNAVAILABLE, not TIMEOUT."""
    async with _silent_server() as port:
        url = f"{DRIVERNAME}://postgres@127.0.0.1:{port}/none"
        # libpq's connect_timeout counts whole seconds, 2 at least.
        bound = {"timeout": 0.2} if DRIVER == "asyncpg" else {"connect_timeout": 2}
        async with private_manager(url, "unused", connect_args=bound) as manager:
            error = await _failure_of(manager, partial(sleep, seconds=0))

    assert isinstance(error, TimeoutError if DRIVER == "asyncpg" else exc.DBAPIError)
    assert classify_error(error) is DatabaseErrorKind.UNAVAILABLE


@pytest.fixture(name="role_without_connections")
async def role_without_connections_fixture(observer: asyncpg.Connection) -> AsyncIterator[str]:
    """A login role allowed no connection at all (superusers ignore connection limits)."""
    role = f"h1_errors_no_connections_{os.getpid()}"
    await observer.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
    yield role
    await observer.execute(f'DROP ROLE "{role}"')


async def test_too_many_connections_is_unavailable(
    database_url: URL, role_without_connections: str
) -> None:
    """The server refusing a connection over a limit (53300) is UNAVAILABLE, wrapped or not."""
    url = database_url.set(username=role_without_connections)
    async with private_manager(url, APPLICATION_NAME) as manager:
        error = await _failure_of(manager, partial(sleep, seconds=0))

    # SQLAlchemy 2.1 wraps the driver's connect errors; 2.0 lets asyncpg's through.
    assert isinstance(error, (exc.DBAPIError, asyncpg.TooManyConnectionsError))
    assert re.search("too many connections for role", str(error)), error
    assert classify_error(error) is DatabaseErrorKind.UNAVAILABLE


async def test_missing_database_is_left_unclassified(database_url: URL) -> None:
    """A database that does not exist (3D000) is a configuration bug, not an outage: no kind.

    It is a failed connection all the same (the test plugin's advice on env.py needs
    it), though psycopg reports it with no SQLSTATE.
    """
    url = database_url.set(database=f"h1_errors_missing_{os.getpid()}")
    async with private_manager(url, APPLICATION_NAME) as manager:
        error = await _failure_of(manager, partial(sleep, seconds=0))

    assert isinstance(error, (exc.DBAPIError, asyncpg.InvalidCatalogNameError))
    assert classify_error(error) is None
    assert failed_to_connect(error)


@pytest.fixture(name="pool_of_one")
async def pool_of_one_fixture(
    database_url: URL, observer: asyncpg.Connection
) -> AsyncIterator[DatabaseSessionManager]:
    """A manager allowed one connection, waiting POOL_TIMEOUT for it at most."""
    async with private_manager(
        database_url, APPLICATION_NAME, pool_size=1, max_overflow=0, pool_timeout=POOL_TIMEOUT
    ) as manager:
        yield manager
        assert checked_out(manager) == 0, "a unit of work kept its connection"


EXHAUSTED_MESSAGE = re.escape(
    # SQLAlchemy's text first, as code may match on it, then what to change.
    "QueuePool limit of size 1 overflow 0 reached, connection timed out, timeout 0.20: "
    "every connection the pool may open stayed in use that long: raise pool_size or "
    "max_overflow if the database can take more connections, hold each for less time "
    "(shorter transactions, no slow calls inside a unit of work), or change pool_timeout"
)


async def test_pool_exhaustion_raises_pool_exhausted_error(
    pool_of_one: DatabaseSessionManager,
) -> None:
    """No free connection within pool_timeout: PoolExhaustedError, naming the numbers and fixes."""
    async with connection_held(pool_of_one):
        error = await _failure_of(pool_of_one, partial(sleep, seconds=0))

    assert isinstance(error, PoolExhaustedError)
    assert re.match(EXHAUSTED_MESSAGE, str(error)), str(error)
    assert isinstance(error.__cause__, exc.TimeoutError)
    assert classify_error(error) is DatabaseErrorKind.UNAVAILABLE


async def test_pool_exhausted_error_is_still_sqlalchemy_timeout_error(
    pool_of_one: DatabaseSessionManager,
) -> None:
    """Code that catches sqlalchemy.exc.TimeoutError keeps catching pool exhaustion."""
    async with connection_held(pool_of_one):
        with pytest.raises(exc.TimeoutError, match=EXHAUSTED_MESSAGE):
            async with pool_of_one.session() as db:
                await db.execute(select(1))


async def test_pool_exhaustion_at_commit_raises_pool_exhausted_error(
    pool_of_one: DatabaseSessionManager,
) -> None:
    """A unit of work that first needs a connection at COMMIT (to flush) gets the same error."""
    async with connection_held(pool_of_one):
        with pytest.raises(PoolExhaustedError, match=EXHAUSTED_MESSAGE):
            async with pool_of_one.session() as db:
                db.add(Item(name="h1-errors-never-stored"))


async def test_nested_pool_exhaustion_is_explained_once(
    pool_of_one: DatabaseSessionManager,
) -> None:
    """A unit of work nested in one holding the only connection: one PoolExhaustedError, not two."""
    with pytest.raises(PoolExhaustedError) as raised:
        async with pool_of_one.session() as outer:
            await outer.execute(select(1))
            async with pool_of_one.session() as inner:
                await inner.execute(select(1))

    assert not isinstance(raised.value.__cause__, PoolExhaustedError)
    assert isinstance(raised.value.__cause__, exc.TimeoutError)
