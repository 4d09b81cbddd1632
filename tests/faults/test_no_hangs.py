"""Promise 3: with the network stalled, every request is answered within a bound set
by the timeouts, with a clear error, and the service recovers when the network does.

The proxy keeps every socket open and forwards nothing, so no TCP error ever
arrives: only the package's timeouts can end the wait.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import QueuePool

from app.database import DatabaseSessionManager, _liveness, get_db, get_read_db
from app.database._config import (
    POOL_TIMEOUT_SECONDS,
)
from app.database.drivers import COMMAND_TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS
from app.main import create_app
from tests.drivers import MIN_CONNECT_TIMEOUT, application_name, command_timeout_of, timeouts
from tests.faults.proxy import FaultProxy
from tests.faults.server import FaultServer
from tests.integration.live_server import serve

# Small enough for the fast tier; the bound scales with the defaults the same way.
POOL_TIMEOUT = 1.0
CONNECT_TIMEOUT = max(1.0, MIN_CONNECT_TIMEOUT)
COMMAND_TIMEOUT = 1.0
PING_TIMEOUT = 1.0
POOL_SIZE = 5
CONCURRENT = 20


def answer_bound(pool: float, connect: float, command: float, ping: float) -> float:
    """The longest a request can wait: for a pooled connection, then for the
    slower of a statement, or a failed liveness ping followed by a reconnect."""
    return pool + max(command, ping + connect)


# What a request may wait with the package's defaults, as the README states it.
DEFAULT_BOUND = answer_bound(
    POOL_TIMEOUT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    COMMAND_TIMEOUT_SECONDS,
    _liveness.PING_TIMEOUT_SECONDS,
)
BOUND = answer_bound(POOL_TIMEOUT, CONNECT_TIMEOUT, COMMAND_TIMEOUT, PING_TIMEOUT)
# Scheduling on a busy two-core machine, not a hang.
SLACK_SECONDS = 1.5


@pytest.fixture(name="manager")
async def manager_fixture(
    fault_server: FaultServer, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[DatabaseSessionManager]:
    """A manager reaching the fault server through the proxy, with short timeouts."""
    monkeypatch.setattr(_liveness, "PING_TIMEOUT_SECONDS", PING_TIMEOUT)
    manager = DatabaseSessionManager()
    manager.init(
        fault_server.app_url(port=proxy.port),
        pool_size=POOL_SIZE,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT,
        connect_args=timeouts(connect=CONNECT_TIMEOUT, command=COMMAND_TIMEOUT),
    )
    yield manager
    proxy.restore()
    await manager.close(grace=0)


@pytest.fixture(name="client")
async def client_fixture(manager: DatabaseSessionManager) -> AsyncIterator[httpx.AsyncClient]:
    """Real HTTP to the reference app, whose sessions come from `manager`."""
    app = create_app()

    async def session_from_manager() -> AsyncIterator[AsyncSession]:
        async with manager.session() as session:
            yield session

    async def read_session_from_manager() -> AsyncIterator[AsyncSession]:
        async with manager.session(read_only=True) as session:
            yield session

    app.dependency_overrides[get_db] = session_from_manager
    app.dependency_overrides[get_read_db] = read_session_from_manager
    async with serve(app) as base_url, httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        yield client


async def _timed_write(client: httpx.AsyncClient) -> tuple[float, int]:
    started = time.monotonic()
    response = await client.post("/items", json={"name": uuid.uuid4().hex})
    return time.monotonic() - started, response.status_code


async def test_the_default_timeouts_apply_alongside_the_callers_connect_args(
    fault_server: FaultServer,
) -> None:
    """Without timeout options, init() bounds the pool wait and each statement."""
    manager = DatabaseSessionManager()
    manager.init(
        fault_server.app_url(),
        connect_args=application_name("no-hangs-defaults"),
    )
    try:
        async with manager.engine.connect() as connection:
            name = await connection.scalar(text("SELECT current_setting('application_name')"))
            raw = await connection.get_raw_connection()
            command_timeout = command_timeout_of(raw.driver_connection)
        pool = manager.engine.pool
        assert isinstance(pool, QueuePool)
        pool_timeout = pool.timeout()
    finally:
        await manager.close()
    assert (name, command_timeout, pool_timeout) == (
        "no-hangs-defaults",
        COMMAND_TIMEOUT_SECONDS,
        POOL_TIMEOUT_SECONDS,
    )
    assert DEFAULT_BOUND == POOL_TIMEOUT_SECONDS + COMMAND_TIMEOUT_SECONDS == 35.0


@pytest.mark.parametrize("idle_before_stall", [0.0, 1.5], ids=["in-use", "idle"])
async def test_every_request_is_answered_while_the_network_is_stalled(
    client: httpx.AsyncClient, proxy: FaultProxy, idle_before_stall: float
) -> None:
    """20 concurrent writes on a stalled network: each gets a 503/504 within the bound."""
    warm = await asyncio.gather(*(_timed_write(client) for _ in range(POOL_SIZE)))
    assert [status for _, status in warm] == [201] * POOL_SIZE
    # "idle": the pooled connections are old enough for the liveness ping to run.
    await asyncio.sleep(idle_before_stall)

    proxy.stall()
    stalled = await asyncio.gather(*(_timed_write(client) for _ in range(CONCURRENT)))
    proxy.restore()

    print(sorted((round(s, 2), c) for s, c in stalled))  # the latencies, for `pytest -s`
    slowest = max(seconds for seconds, _ in stalled)
    statuses = {status for _, status in stalled}
    assert slowest <= BOUND + SLACK_SECONDS, f"slowest answer {slowest:.2f} s, bound {BOUND} s"
    assert statuses <= {503, 504}, statuses
    after = [await _timed_write(client) for _ in range(20)]
    assert [status for _, status in after] == [201] * 20


async def test_a_server_that_accepts_but_never_answers_fails_within_the_connect_timeout(
    client: httpx.AsyncClient, proxy: FaultProxy
) -> None:
    """A hung server (TCP accepted, no reply) costs one connect timeout, not the driver's own."""
    proxy.accept_then_stall()
    seconds, status = await _timed_write(client)  # the pool is empty: it must connect
    assert status == 503
    assert CONNECT_TIMEOUT <= seconds <= CONNECT_TIMEOUT + SLACK_SECONDS
