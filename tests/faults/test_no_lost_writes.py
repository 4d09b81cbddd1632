"""Promise 1: across server restarts, crashes, killed backends and cut COMMITs, no
acknowledged write is lost and none appears from nowhere (50 clients, real HTTP).

The fast tier runs each scenario for a few seconds; `make soak` runs them for a
minute each and prints the figures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.faults.proxy import FaultProxy
from tests.faults.scenarios import FAULTS, run_scenario
from tests.faults.server import CANARY_PASSWORD, FaultServer
from tests.faults.service import Service, running_service

CLIENTS = 50
SECONDS = 4.0
FAULT_AT = 1.0
# The pool the reference service builds by default: 15 kept connections, no overflow.
POOL_CAPACITY = 15
NOISE = (
    "Traceback",
    "never awaited",
    "Event loop is closed",
    "garbage collector",
    "Task was destroyed",
    CANARY_PASSWORD,
)


@pytest.fixture(name="service")
async def service_fixture(fault_server: FaultServer, proxy: FaultProxy) -> AsyncIterator[Service]:
    """The reference service in its own uvicorn process, reaching PostgreSQL via the proxy."""
    async with running_service(fault_server.app_url(port=proxy.port)) as service:
        yield service
    noise = [word for word in NOISE if word in service.stderr]
    assert not noise, f"the service wrote {noise} to stderr:\n{service.stderr[-3000:]}"


@pytest.mark.parametrize("scenario", list(FAULTS))
async def test_no_acknowledged_write_is_lost(
    scenario: str, fault_server: FaultServer, proxy: FaultProxy, service: Service
) -> None:
    """Every 2xx write is stored, nothing unsent is stored, and writes after recovery succeed."""
    figures = await run_scenario(
        scenario,
        fault_server,
        proxy,
        service.base_url,
        clients=CLIENTS,
        seconds=SECONDS,
        fault_at=FAULT_AT,
    )
    print(figures.line())  # the figures, for `pytest -s`
    outcome = figures.outcome
    assert (outcome.lost, outcome.phantom) == (0, 0), figures.line()
    assert figures.failed_after_ready == 0, figures.line()
    assert figures.recovery_seconds is not None, figures.line()
    # A write is ambiguous only when its COMMIT was carried out but the answer lost.
    if scenario == "ack lost after COMMIT":
        assert outcome.ambiguous == figures.acks_lost > 0, figures.line()
    if scenario == "cut before COMMIT":
        assert figures.commits_dropped > 0, figures.line()
        assert outcome.ambiguous == 0, figures.line()
    assert figures.checked_out_after == 0, figures.line()
    assert figures.idle_in_transaction_after == 0, figures.line()
    assert figures.backends_after <= POOL_CAPACITY, figures.line()
