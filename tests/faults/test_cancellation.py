"""Cancellation leaks nothing: units of work cancelled at every phase, by every mechanism.

Scenarios C-01, C-02, C-03 and C-06 of the reliability matrix, in a short seeded
run, and C-01/C-02 seen from the server (the cancelled statement stops there);
`python -m tests.faults.cancellation` is the 1,000-iteration soak.
CANCEL_ITERATIONS (per style) and FAULT_SEED override the run's size and seed.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from sqlalchemy.engine import URL

from app.database import DatabaseSessionManager
from benchmarks.request_path.pgbouncer import PgBouncer
from tests.drivers import application_name
from tests.faults.cancel_invariants import StyleReport
from tests.faults.cancel_noise import (
    NOISE_LOGGERS,
    collected_garbage_warnings,
    noise_in,
    split_noise,
)
from tests.faults.cancel_phases import PHASES
from tests.faults.cancel_queued_waiters import QueueReport, cancel_queued_waiters
from tests.faults.cancel_server_side import (
    STOP_SECONDS,
    cancel_before_the_backend_reads,
    cancel_running_statement,
)
from tests.faults.cancel_workload import POOL_CAPACITY, create_schema, drop_schema, open_manager
from tests.faults.cancellation import run_style
from tests.postgres import asyncpg_dsn

ITERATIONS = int(os.environ.get("CANCEL_ITERATIONS", "150"))
# Over uvicorn each request runs to its end whatever the client does: fewer of them.
HTTP_ITERATIONS = max(10, ITERATIONS // 5)
SEED = int(os.environ.get("FAULT_SEED") or secrets.randbelow(1_000_000))
APPLICATION_NAME = f"h2-cancel-{os.getpid()}"


@pytest.fixture(name="pairs_dsn")
async def pairs_dsn_fixture(database_url: URL) -> AsyncIterator[str]:
    """The test database with the pairs table and its slow deferred trigger, dropped after."""
    dsn = asyncpg_dsn(database_url)
    await create_schema(dsn)
    try:
        yield dsn
    finally:
        await drop_schema(dsn)


@pytest.fixture(name="manager")
async def manager_fixture(
    database_url: URL, pairs_dsn: str
) -> AsyncIterator[DatabaseSessionManager]:
    """A manager of its own: a pool of 4, identified by APPLICATION_NAME on the server."""
    manager = open_manager(database_url, APPLICATION_NAME)
    try:
        yield manager
    finally:
        await manager.close()


Noise = Callable[[], list[logging.LogRecord]]


@pytest.fixture(name="noise")
def noise_fixture(caplog: pytest.LogCaptureFixture) -> Noise:
    """What the test logged so far: every logger's warnings, asyncio's and the pool's DEBUG too."""
    for name in NOISE_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    # Read when called: pytest gives each phase (setup, call) a new list of records,
    # so a list taken here, during setup, would never see what the test logs.
    return lambda: caplog.records


RunStyle = Callable[[str, int], Awaitable[StyleReport]]


@pytest.fixture(name="run_cancelled")
def run_cancelled_fixture(
    manager: DatabaseSessionManager, pairs_dsn: str, noise: Noise
) -> RunStyle:
    """A function running n units of work in a style on `manager`: its report, noise included."""

    async def run(style: str, iterations: int) -> StyleReport:
        report = await run_style(manager, style, iterations, SEED, pairs_dsn, APPLICATION_NAME)
        garbage = collected_garbage_warnings()  # first: what the collector finds is logged too
        report.noise, report.asyncpg_connect_noise = split_noise(garbage + noise_in(noise()))
        return report

    return run


@pytest.mark.parametrize("style", ["task", "anyio", "asgi-task", "asgi-anyio"])
async def test_cancellation_at_any_phase_leaks_nothing(run_cancelled: RunStyle, style: str) -> None:
    """Units of work cancelled at random phases leave no connection, transaction or half pair."""
    report = await run_cancelled(style, ITERATIONS)

    assert not report.violations(), f"rerun with FAULT_SEED={SEED}: {report.line()}"
    missed = [phase for phase in PHASES if not report.landed[phase]]
    assert not missed, f"no cancellation landed in {missed} (FAULT_SEED={SEED}): {report.line()}"


@pytest.fixture(name="pooled_manager")
async def pooled_manager_fixture(
    database_url: URL, pairs_dsn: str
) -> AsyncIterator[DatabaseSessionManager]:
    """Like `manager`, through a private PgBouncer in transaction mode (transaction_pooler)."""
    with PgBouncer(database_url, pool_size=POOL_CAPACITY) as pgbouncer:
        manager = open_manager(
            pgbouncer.url(database_url), APPLICATION_NAME, transaction_pooler=True
        )
        try:
            yield manager
        finally:
            await manager.close()


@pytest.mark.parametrize("style", ["task", "anyio"])
async def test_cancellation_through_pgbouncer_leaks_nothing(
    pooled_manager: DatabaseSessionManager, pairs_dsn: str, noise: Noise, style: str
) -> None:
    """Through a transaction pooler too: no server connection left in a transaction or leaked."""
    report = await run_style(pooled_manager, style, ITERATIONS, SEED, pairs_dsn, APPLICATION_NAME)
    report.noise, report.asyncpg_connect_noise = split_noise(
        collected_garbage_warnings() + noise_in(noise())
    )

    assert not report.violations(), f"rerun with FAULT_SEED={SEED}: {report.line()}"
    assert report.outcomes["cancelled"] > 0, report.line()


@pytest.mark.parametrize("style", ["http", "http-basemw"])
async def test_client_disconnect_over_uvicorn_leaks_nothing(
    run_cancelled: RunStyle, style: str
) -> None:
    """Clients resetting their connection mid-request leave nothing; their writes still commit."""
    report = await run_cancelled(style, HTTP_ITERATIONS)

    assert not report.violations(), f"rerun with FAULT_SEED={SEED}: {report.line()}"
    # uvicorn does not cancel a request whose client went away, with or without
    # BaseHTTPMiddleware: the unit of work runs on and commits, unseen by anyone.
    assert report.outcomes["cancelled"] == 0, report.line()
    assert report.late_commits > 0, report.line()


@pytest.mark.parametrize("style", ["task", "anyio"])
async def test_waiters_cancelled_in_the_pool_queue_lose_no_slot(
    database_url: URL, noise: Noise, style: str
) -> None:
    """15 of 20 sessions queued for a pool of 2 are cancelled: both slots come back."""
    manager = DatabaseSessionManager()
    # pool_timeout=2: a slot lost for good fails the final checkouts instead of hanging,
    # and a pool queue that never holds all 20 waiters fails the run within 2 s.
    manager.init(
        database_url,
        pool_size=2,
        max_overflow=0,
        pool_timeout=2,
        connect_args=application_name(APPLICATION_NAME),
    )
    try:
        report = await cancel_queued_waiters(manager, style, waiters=20, cancelled=15)
    finally:
        await manager.close()

    assert report == QueueReport(cancelled=15, served=5, checked_out_after=0, concurrent_after=2)
    garbage = collected_garbage_warnings()
    unexpected, _asyncpg_connect_noise = split_noise(garbage + noise_in(noise()))
    assert unexpected == []


@pytest.mark.parametrize("style", ["task", "anyio"])
async def test_statement_cancelled_mid_flight_stops_on_the_server(
    manager: DatabaseSessionManager, pairs_dsn: str, noise: Noise, style: str
) -> None:
    """A unit of work cancelled during a 20 s statement: the server stops it, within 2 s."""
    report = await cancel_running_statement(manager, style, pairs_dsn, APPLICATION_NAME)

    assert report.outcome == "cancelled", report
    # Otherwise the backend runs the statement to its end, holding its locks and its
    # transaction open, although the connection was given back to the pool.
    assert report.still_running == 0, f"still running {STOP_SECONDS} s on: {report}"
    garbage = collected_garbage_warnings()
    unexpected, _asyncpg_connect_noise = split_noise(garbage + noise_in(noise()))
    assert unexpected == []


async def test_a_cancel_that_comes_before_the_statement_is_read_is_sent_again(
    manager: DatabaseSessionManager, pairs_dsn: str
) -> None:
    """The backend is stopped with the statement in its socket when the unit of work is
    cancelled: the CancelRequests sent at once find it idle and are ignored, it runs the
    statement once it continues, and a repeated CancelRequest stops it within 2 s."""
    report = await cancel_before_the_backend_reads(manager, pairs_dsn, stopped_seconds=0.15)

    assert report.outcome == "cancelled", report
    # Otherwise the scenario did not happen: the statement never ran after the cancel.
    assert report.ran_after_the_cancel, report
    assert report.still_running == 0, f"still running {STOP_SECONDS} s on: {report}"
