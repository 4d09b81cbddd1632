"""Promise 1 behind a transaction-mode PgBouncer: across PgBouncer restarts, a server
restart behind it, RECONNECT, PAUSE/RESUME and cut COMMITs, no acknowledged write is
lost and none appears from nowhere (50 clients, real HTTP, real PgBouncer 1.18).

The service runs with `DATABASE_TRANSACTION_POOLER=1`; a fault proxy sits between
it and PgBouncer, which sits in front of the private cluster with 5 server
connections for the service's 15. `soak --pgbouncer` runs the same for a minute.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.faults.pgbouncer import PgBouncer
from tests.faults.proxy import FaultProxy
from tests.faults.scenarios import (
    ACK_LOST_SCENARIOS,
    COMMIT_DROP_SCENARIOS,
    LOAD_PGBOUNCER_POOL_SIZE,
    LOAD_POOL_SIZE,
    LOAD_SERVICES,
    PAUSE_SCENARIO,
    PAUSE_SECONDS,
    PGBOUNCER_POOL_SIZE,
    POOL_TIMEOUT_SECONDS,
    POOLER_ENV,
    POOLER_FAULTS,
    run_load,
    run_scenario,
    running_services,
)
from tests.faults.server import APP_ROLE, CANARY_PASSWORD, DATABASE, FaultServer
from tests.faults.service import Service, running_service
from tests.faults.test_no_lost_writes import CLIENTS, FAULT_AT, NOISE, SECONDS


def _assert_quiet(service: Service) -> None:
    noise = [word for word in NOISE if word in service.stderr]
    assert not noise, f"the service wrote {noise} to stderr:\n{service.stderr[-3000:]}"


@pytest.fixture(name="pooled_service")
async def pooled_service_fixture(
    pgbouncer: PgBouncer, pooler_proxy: FaultProxy
) -> AsyncIterator[Service]:
    """The reference service in its own uvicorn process, reaching PgBouncer via the proxy."""
    url = pgbouncer.app_url(port=pooler_proxy.port)
    async with running_service(url, env=POOLER_ENV) as service:
        yield service
    _assert_quiet(service)


async def test_pgbouncer_checks_the_password(pgbouncer: PgBouncer) -> None:
    """PgBouncer refuses a wrong password, accepts the app's, and never logs it."""
    connect = {"host": "127.0.0.1", "port": pgbouncer.port, "user": APP_ROLE}
    with pytest.raises((asyncpg.InvalidPasswordError, asyncpg.ProtocolViolationError)):
        await asyncpg.connect(**connect, password="not-the-password", database=DATABASE)
    connection = await asyncpg.connect(**connect, password=CANARY_PASSWORD, database=DATABASE)
    try:
        # The simple protocol (no arguments): no prepared statement to lose between
        # transactions, whatever the package does.
        assert await connection.execute("SELECT 1") == "SELECT 1"
    finally:
        await connection.close()
    assert CANARY_PASSWORD not in pgbouncer.log.read_text()


def test_admin_console_and_restart(pgbouncer: PgBouncer) -> None:
    """The admin console shows the transaction pool; both stop modes restart on the same port."""
    port = pgbouncer.port
    for mode in ("safe", "immediate"):
        pgbouncer.restart(mode)
        assert (pgbouncer.is_running(), pgbouncer.port) == (True, port)
    databases = {row["name"]: row for row in pgbouncer.show("DATABASES")}
    assert databases[DATABASE]["pool_size"] == str(PGBOUNCER_POOL_SIZE)
    pools = [row for row in pgbouncer.show("POOLS") if row["database"] == DATABASE]
    assert all(row["pool_mode"] == "transaction" for row in pools)
    pgbouncer.admin("PAUSE")
    pgbouncer.resume_if_paused()
    pgbouncer.resume_if_paused()  # not paused any more: nothing to do


@pytest.mark.parametrize("scenario", list(POOLER_FAULTS))
async def test_no_acknowledged_write_is_lost_behind_pgbouncer(
    scenario: str,
    fault_server: FaultServer,
    pgbouncer: PgBouncer,
    pooler_proxy: FaultProxy,
    pooled_service: Service,
) -> None:
    """Every 2xx write is stored, nothing unsent is stored, and writes after recovery succeed."""
    figures = await run_scenario(
        scenario,
        fault_server,
        pooler_proxy,
        pooled_service.base_url,
        clients=CLIENTS,
        seconds=SECONDS,
        fault_at=FAULT_AT,
        pgbouncer=pgbouncer,
    )
    print(figures.line())  # the figures, for `pytest -s`
    outcome = figures.outcome
    assert (outcome.lost, outcome.phantom) == (0, 0), figures.line()
    assert figures.failed_after_ready == 0, figures.line()
    assert figures.recovery_seconds is not None, figures.line()
    # A write is ambiguous only when its COMMIT was carried out but the answer lost.
    if scenario in ACK_LOST_SCENARIOS:
        assert outcome.ambiguous == figures.acks_lost > 0, figures.line()
    if scenario in COMMIT_DROP_SCENARIOS:
        assert figures.commits_dropped > 0, figures.line()
        assert outcome.ambiguous == 0, figures.line()
    if scenario == PAUSE_SCENARIO:
        # PAUSE holds queries rather than refusing them: within the pool's timeout
        # nothing fails at all, and what waited is answered soon after RESUME.
        assert PAUSE_SECONDS < POOL_TIMEOUT_SECONDS  # the premise of "nothing fails"
        assert (outcome.refused, outcome.transport_errors) == (0, 0), figures.line()
        assert figures.last_answer_after_ready < POOL_TIMEOUT_SECONDS, figures.line()
    assert figures.checked_out_after == 0, figures.line()
    assert figures.idle_in_transaction_after == 0, figures.line()
    assert figures.backends_after <= pgbouncer.pool_size, figures.line()


async def test_services_share_fewer_server_connections(fault_server: FaultServer) -> None:
    """4 services of 20 connections on PgBouncer's 10: every write succeeds and is stored."""
    if not fault_server.is_running():  # a test that stopped it must not break this one
        fault_server.start()
    with PgBouncer(fault_server.port, pool_size=LOAD_PGBOUNCER_POOL_SIZE) as pgbouncer:
        env = {"DATABASE_POOL_SIZE": str(LOAD_POOL_SIZE)}
        async with running_services(pgbouncer, LOAD_SERVICES, env) as services:
            figures = await run_load(
                fault_server,
                pgbouncer,
                services,
                pool_size=LOAD_POOL_SIZE,
                clients=CLIENTS,
                seconds=SECONDS,
            )
    print(figures.line())  # the figures, for `pytest -s`
    for service in services:
        _assert_quiet(service)
    outcome = figures.outcome
    assert outcome.acknowledged == outcome.requests > 0, figures.line()
    assert (outcome.lost, outcome.ambiguous, outcome.phantom) == (0, 0, 0), figures.line()
    assert figures.checked_out_after == 0, figures.line()
    assert figures.idle_in_transaction_after == 0, figures.line()
    assert figures.backends_after <= LOAD_PGBOUNCER_POOL_SIZE, figures.line()
