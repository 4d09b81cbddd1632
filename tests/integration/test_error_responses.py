"""Over HTTP: each kind of database failure gets its status code, Retry-After and a bland body.

The routes commit for real through `AsyncSessionDep`, on a manager of the test's
own (`get_db` overridden), so failures at COMMIT reach the handlers too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import exc
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import (
    AsyncSessionDep,
    DatabaseSessionManager,
    TransactionAbortedError,
    get_db,
    get_read_db,
)
from app.errors import install_error_handlers
from app.main import create_app
from tests.drivers import DRIVERNAME
from tests.integration.failing_work import (
    Rendezvous,
    connection_held,
    insert_duplicate,
    insert_null,
    insert_orphan_checked_at_commit,
    lock_rows_in_order,
    lose_connection_mid_transaction,
    manager_on_error_tables,
    private_manager,
    sleep,
    sleep_past_statement_timeout,
    terminate_backend,
    write_in_read_only_transaction,
    write_skew,
)
from tests.postgres import checked_out, count_backends

APPLICATION_NAME = "h1_errors_responses"

CONFLICT = {"detail": "the request conflicts with the current data"}
COLLIDED = {"detail": "the request collided with a concurrent one and was not applied; retry it"}
UNAVAILABLE = {"detail": "the database is unavailable; retry later"}
AT_CAPACITY = {"detail": "the service is at capacity; retry shortly"}
TIMED_OUT = {"detail": "the database did not answer in time"}


def _sessions_of(
    manager: DatabaseSessionManager, *, read_only: bool = False
) -> Callable[[], AsyncIterator[AsyncSession]]:
    """A replacement for `get_db` (or `get_read_db`) taking its units of work from `manager`."""

    async def get_db_of_manager() -> AsyncIterator[AsyncSession]:
        async with manager.session(read_only=read_only) as session:
            yield session

    return get_db_of_manager


def _failing_app(terminate: Callable[[int], object]) -> FastAPI:
    """Routes that fail in each way, with the reference service's error handlers."""
    app = FastAPI()
    install_error_handlers(app)
    skew, deadlock = Rendezvous(), Rendezvous()

    @app.post("/duplicate")
    async def duplicate(db: AsyncSessionDep) -> None:
        await insert_duplicate(db)

    # The mistake of catching a database error and carrying on: COMMIT is refused.
    @app.post("/duplicate-caught")
    async def duplicate_caught(db: AsyncSessionDep) -> None:
        with contextlib.suppress(exc.DBAPIError):
            await insert_duplicate(db)

    @app.post("/null-caught")
    async def null_caught(db: AsyncSessionDep) -> None:
        with contextlib.suppress(exc.DBAPIError):
            await insert_null(db)

    @app.post("/orphan-checked-at-commit")
    async def orphan_checked_at_commit(db: AsyncSessionDep) -> None:
        await insert_orphan_checked_at_commit(db)

    @app.post("/null")
    async def null(db: AsyncSessionDep) -> None:
        await insert_null(db)

    @app.post("/skew/{row}")
    async def skew_half(db: AsyncSessionDep, row: int) -> None:
        await write_skew(db, skew, row)

    @app.post("/deadlock/{first}/{second}")
    async def deadlock_half(db: AsyncSessionDep, first: int, second: int) -> None:
        await lock_rows_in_order(db, deadlock, first, second)

    @app.get("/statement-timeout")
    async def statement_timeout(db: AsyncSessionDep) -> None:
        await sleep_past_statement_timeout(db)

    @app.get("/sleep")
    async def sleep_route(db: AsyncSessionDep, seconds: float = 0) -> None:
        await sleep(db, seconds)

    @app.post("/read-only")
    async def read_only(db: AsyncSessionDep) -> None:
        await write_in_read_only_transaction(db)

    @app.get("/lose-connection")
    async def lose_connection(db: AsyncSessionDep) -> None:
        await lose_connection_mid_transaction(db, terminate)

    @app.get("/value-error")
    async def value_error() -> None:
        raise ValueError("a bug of the application's own")

    @app.get("/os-error")
    async def os_error() -> None:
        raise ConnectionRefusedError(111, "another service refused")

    return app


@asynccontextmanager
async def _client(
    app: FastAPI, manager: DatabaseSessionManager
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for `app` whose AsyncSessionDep sessions come from `manager`."""
    app.dependency_overrides[get_db] = _sessions_of(manager)
    app.dependency_overrides[get_read_db] = _sessions_of(manager, read_only=True)
    # raise_app_exceptions=False: a 500 arrives as the response a real server sends.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture(name="manager")
async def manager_fixture(
    database_url: URL, observer: asyncpg.Connection
) -> AsyncIterator[DatabaseSessionManager]:
    """A manager of this module's own, on the error tables."""
    async with manager_on_error_tables(database_url, observer, APPLICATION_NAME) as manager:
        yield manager


@pytest.fixture(name="failing_app")
def failing_app_fixture(observer: asyncpg.Connection) -> FastAPI:
    """The failing routes, able to end their own backend through `observer`."""
    return _failing_app(partial(terminate_backend, observer))


@pytest.fixture(name="client")
async def client_fixture(
    failing_app: FastAPI, manager: DatabaseSessionManager
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the failing routes on the module's manager."""
    async with _client(failing_app, manager) as client:
        yield client


async def test_unique_violation_answers_409(client: httpx.AsyncClient) -> None:
    """A duplicate key is a 409 whose body names the problem, not the SQL."""
    response = await client.post("/duplicate")

    assert (response.status_code, response.json()) == (409, CONFLICT)
    assert "retry-after" not in response.headers


async def test_violation_at_commit_answers_409(client: httpx.AsyncClient) -> None:
    """A deferred foreign key failing at get_db's COMMIT, after the route returned, is a 409."""
    response = await client.post("/orphan-checked-at-commit")

    assert (response.status_code, response.json()) == (409, CONFLICT)


async def test_caught_conflict_answers_409_and_logs_the_statement(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A route that swallowed a duplicate key: nothing was written, it answers as the conflict.

    The bug is logged naming the failed statement and its SQLSTATE, not the driver's
    message, whose DETAIL carries the row's values.
    """
    with caplog.at_level(logging.ERROR, logger="app.errors"):
        response = await client.post("/duplicate-caught")

    assert response.status_code == 409
    assert response.json() == CONFLICT
    [record] = [record for record in caplog.records if record.name == "app.errors"]
    assert record.levelno == logging.ERROR
    assert "INSERT INTO errors_parent VALUES (1, 0)" in caplog.text
    assert "23505" in caplog.text
    assert record.exc_info is None
    assert "Key (" not in caplog.text  # the DETAIL naming the duplicate's values


async def test_caught_unclassified_error_stays_a_500_naming_the_statement(
    failing_app: FastAPI, manager: DatabaseSessionManager
) -> None:
    """A swallowed not-null violation (a bug) fails the request with a 500 whose cause is it."""
    async with _client(failing_app, manager) as client:
        assert (await client.post("/null-caught")).status_code == 500

    # What the server logs: the refusal, caused by the statement that failed.
    failing_app.dependency_overrides[get_db] = _sessions_of(manager)
    transport = httpx.ASGITransport(app=failing_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(TransactionAbortedError) as raised:
            await client.post("/null-caught")
    assert "INSERT INTO errors_parent VALUES (3, NULL)" in str(raised.value.__cause__)


async def test_serialization_failure_answers_503_with_retry_after(
    client: httpx.AsyncClient,
) -> None:
    """Of a write skew between two requests, the loser gets 503 and Retry-After: 1."""
    responses = await asyncio.gather(client.post("/skew/1"), client.post("/skew/2"))

    assert sorted(response.status_code for response in responses) == [200, 503]
    loser = max(responses, key=lambda response: response.status_code)
    assert loser.json() == COLLIDED
    assert loser.headers["retry-after"] == "1"


async def test_deadlock_answers_503_with_retry_after(client: httpx.AsyncClient) -> None:
    """Two requests locking rows in opposite orders: the deadlock victim gets 503, Retry-After 1."""
    responses = await asyncio.gather(client.post("/deadlock/1/2"), client.post("/deadlock/2/1"))

    assert sorted(response.status_code for response in responses) == [200, 503]
    loser = max(responses, key=lambda response: response.status_code)
    assert loser.json() == COLLIDED
    assert loser.headers["retry-after"] == "1"


async def test_statement_timeout_answers_504(client: httpx.AsyncClient) -> None:
    """A statement the server cancelled at statement_timeout is a 504, with no Retry-After."""
    response = await client.get("/statement-timeout")

    assert (response.status_code, response.json()) == (504, TIMED_OUT)
    assert "retry-after" not in response.headers


async def test_client_command_timeout_answers_504(
    failing_app: FastAPI, database_url: URL, observer: asyncpg.Connection
) -> None:
    """The driver's command_timeout (asyncpg's: a bare TimeoutError) is a 504 too."""
    async with (
        manager_on_error_tables(
            database_url, observer, APPLICATION_NAME, connect_args={"command_timeout": 0.2}
        ) as manager,
        _client(failing_app, manager) as client,
    ):
        response = await client.get("/sleep", params={"seconds": 5})

    assert (response.status_code, response.json()) == (504, TIMED_OUT)


async def test_read_only_transaction_answers_503_with_retry_after(
    client: httpx.AsyncClient,
) -> None:
    """A write refused as read-only, as after a failover, is a 503 with Retry-After: 5."""
    response = await client.post("/read-only")

    assert (response.status_code, response.json()) == (503, UNAVAILABLE)
    assert response.headers["retry-after"] == "5"


async def test_connection_lost_mid_request_answers_503(client: httpx.AsyncClient) -> None:
    """A backend ended by the server during the request is a 503 with Retry-After: 5."""
    response = await client.get("/lose-connection")

    assert (response.status_code, response.json()) == (503, UNAVAILABLE)
    assert response.headers["retry-after"] == "5"


async def test_unreachable_database_answers_503(failing_app: FastAPI) -> None:
    """Nothing listening at the database's address is a 503 with Retry-After: 5."""
    url = f"{DRIVERNAME}://postgres@127.0.0.1:1/none"
    async with (
        private_manager(url, APPLICATION_NAME) as manager,
        _client(failing_app, manager) as client,
    ):
        response = await client.get("/sleep")

    assert (response.status_code, response.json()) == (503, UNAVAILABLE)
    assert response.headers["retry-after"] == "5"


async def test_unclassified_database_error_answers_500(client: httpx.AsyncClient) -> None:
    """A database error with no kind (a not-null violation: a bug) stays a 500."""
    response = await client.post("/null")

    assert response.status_code == 500


@pytest.mark.parametrize("path", ["/value-error", "/os-error"])
async def test_non_database_errors_still_answer_500(client: httpx.AsyncClient, path: str) -> None:
    """The handlers re-raise what is not a database error: a ValueError or a foreign OSError."""
    response = await client.get(path)

    assert response.status_code == 500


@asynccontextmanager
async def _pool_of(
    database_url: URL, capacity: int, pool_timeout: float, application_name: str = APPLICATION_NAME
) -> AsyncIterator[DatabaseSessionManager]:
    async with private_manager(
        database_url,
        application_name,
        pool_size=capacity,
        max_overflow=0,
        pool_timeout=pool_timeout,
    ) as manager:
        yield manager


async def test_reference_app_answers_503_when_the_pool_is_exhausted(database_url: URL) -> None:
    """The reference service (create_app) answers pool exhaustion with 503 and Retry-After: 1."""
    async with (
        _pool_of(database_url, capacity=1, pool_timeout=0.2) as manager,
        connection_held(manager),
        _client(create_app(), manager) as client,
    ):
        response = await client.get("/items")

    assert (response.status_code, response.json()) == (503, AT_CAPACITY)
    assert response.headers["retry-after"] == "1"


BURST = 40
CAPACITY = 2
POOL_TIMEOUT = 0.2
HOLD_SECONDS = 0.3


async def _timed_get(
    client: httpx.AsyncClient, path: str, **params: float
) -> tuple[int, str | None, float]:
    started = time.monotonic()
    response = await client.get(path, params=params)
    return response.status_code, response.headers.get("retry-after"), time.monotonic() - started


# A name of the burst's own: backends of earlier tests may still be exiting.
BURST_APPLICATION_NAME = "h1_errors_burst"


async def test_burst_beyond_pool_capacity_gets_prompt_503s_and_recovers(
    failing_app: FastAPI, database_url: URL, observer: asyncpg.Connection
) -> None:
    """40 requests at a pool of 2 get 200s and prompt 503s; then the service answers 200 again."""
    async with (
        _pool_of(
            database_url, CAPACITY, POOL_TIMEOUT, application_name=BURST_APPLICATION_NAME
        ) as manager,
        _client(failing_app, manager) as client,
    ):
        outcomes = await asyncio.gather(
            *(_timed_get(client, "/sleep", seconds=HOLD_SECONDS) for _ in range(BURST))
        )
        backends_after_burst = await count_backends(observer, BURST_APPLICATION_NAME)
        afterwards = [await _timed_get(client, "/sleep") for _ in range(3)]
        leaked = checked_out(manager)

    statuses = [status for status, _, _ in outcomes]
    slowest = max(elapsed for _, _, elapsed in outcomes)
    slowest_503 = max((elapsed for status, _, elapsed in outcomes if status == 503), default=0.0)
    # The figures, for `pytest -s`.
    print(
        f"\n[pool exhaustion] {BURST} requests, pool of {CAPACITY}, pool_timeout {POOL_TIMEOUT} s,"
        f" each 200 holds {HOLD_SECONDS} s: {statuses.count(200)} x 200,"
        f" {statuses.count(503)} x 503; slowest 503 after {slowest_503:.3f} s"
        f" ({slowest_503 / POOL_TIMEOUT:.2f} x pool_timeout), slowest answer {slowest:.3f} s;"
        f" {backends_after_burst} backends after the burst"
    )
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= CAPACITY, statuses
    assert {retry_after for status, retry_after, _ in outcomes if status == 503} == {"1"}
    # Nobody queued behind the burst: each answer came within the wait plus one hold,
    # with a generous margin for a loaded machine.
    assert slowest < POOL_TIMEOUT + HOLD_SECONDS + 3, slowest
    assert backends_after_burst <= CAPACITY
    assert [status for status, _, _ in afterwards] == [200, 200, 200]
    assert leaked == 0
