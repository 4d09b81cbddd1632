"""The soak tier (`make soak`): each fault scenario for about a minute under 50 writers.

Prints one line of figures per scenario and exits non-zero if any promise broke.
Run it on a quiet machine; the figures in the README came from it.

`--pgbouncer` runs the scenarios through a transaction-mode PgBouncer instead (the
service with `DATABASE_TRANSACTION_POOLER=1`, a fault proxy between it and
PgBouncer), then a load scenario without a fault: 4 services of 20 connections
each sharing PgBouncer's 10 server connections under the same writers.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tests.faults.pgbouncer import PgBouncer
from tests.faults.proxy import FaultProxy
from tests.faults.scenarios import (
    ACK_LOST_SCENARIOS,
    COMMIT_DROP_SCENARIOS,
    FAULTS,
    LOAD_PGBOUNCER_POOL_SIZE,
    LOAD_POOL_SIZE,
    LOAD_SERVICES,
    PAUSE_SCENARIO,
    PGBOUNCER_POOL_SIZE,
    POOL_TIMEOUT_SECONDS,
    POOLER_ENV,
    POOLER_FAULTS,
    Figures,
    LoadFigures,
    run_load,
    run_scenario,
    running_services,
)
from tests.faults.server import FaultServer
from tests.faults.service import running_service

LOAD_SCENARIO = "pgbouncer load"


def broken_promises(figures: Figures, max_backends: int | None = None) -> list[str]:
    """The promises a run broke, by name; empty when all held."""
    outcome = figures.outcome
    checks = {
        "LOST=0": outcome.lost == 0,
        "PHANTOM=0": outcome.phantom == 0,
        "no failures after ready": figures.failed_after_ready == 0,
        "recovered": figures.recovery_seconds is not None,
        "ambiguous only where an answer to COMMIT was lost": (
            outcome.ambiguous == figures.acks_lost
            or figures.scenario not in COMMIT_DROP_SCENARIOS + ACK_LOST_SCENARIOS
        ),
        "nothing checked out after": figures.checked_out_after == 0,
        "no idle transaction after": figures.idle_in_transaction_after == 0,
    }
    if max_backends is not None:
        checks[f"at most {max_backends} backends after"] = figures.backends_after <= max_backends
    if figures.scenario == PAUSE_SCENARIO:
        # A PAUSE shorter than pool_timeout holds requests; it must not fail them.
        checks["nothing failed during the PAUSE"] = outcome.refused == outcome.transport_errors == 0
        checks[f"answered within {POOL_TIMEOUT_SECONDS:.0f} s of RESUME"] = (
            figures.last_answer_after_ready < POOL_TIMEOUT_SECONDS
        )
    return [name for name, held in checks.items() if not held]


def load_broken_promises(figures: LoadFigures) -> list[str]:
    """The promises a load run broke, by name; empty when all held."""
    outcome = figures.outcome
    checks = {
        "every write acknowledged": outcome.acknowledged == outcome.requests > 0,
        "LOST=0": outcome.lost == 0,
        "PHANTOM=0": outcome.phantom == 0,
        "AMBIGUOUS=0": outcome.ambiguous == 0,
        "nothing checked out after": figures.checked_out_after == 0,
        "no idle transaction after": figures.idle_in_transaction_after == 0,
        f"at most {figures.pgbouncer_pool_size} backends after": (
            figures.backends_after <= figures.pgbouncer_pool_size
        ),
    }
    return [name for name, held in checks.items() if not held]


def _report(line: str, broken: list[str]) -> None:
    suffix = f" | BROKEN: {', '.join(broken)}" if broken else ""
    print(line + suffix, flush=True)


async def soak(scenarios: list[str], clients: int, seconds: float) -> int:
    """Run `scenarios` one after another on a fresh cluster; returns the exit status."""
    server = FaultServer()
    failures = 0
    try:
        server.create()
        server.migrate()
        for scenario in scenarios:
            with FaultProxy(upstream_port=server.port) as proxy:
                async with running_service(server.app_url(port=proxy.port)) as service:
                    figures = await run_scenario(
                        scenario,
                        server,
                        proxy,
                        service.base_url,
                        clients=clients,
                        seconds=seconds,
                        fault_at=seconds / 3,
                    )
            broken = broken_promises(figures)
            failures += bool(broken)
            _report(figures.line(), broken)
    finally:
        server.destroy()
    return 1 if failures else 0


async def soak_pgbouncer(scenarios: list[str], clients: int, seconds: float) -> int:
    """Run `scenarios` through a fresh PgBouncer each, on a fresh cluster; the exit status."""
    server = FaultServer()
    failures = 0
    try:
        server.create()
        server.migrate()
        for scenario in scenarios:
            if scenario == LOAD_SCENARIO:
                load = await _load(server, clients, seconds)
                broken, line = load_broken_promises(load), load.line()
            else:
                figures = await _pooler_scenario(server, scenario, clients, seconds)
                broken, line = broken_promises(figures, PGBOUNCER_POOL_SIZE), figures.line()
            failures += bool(broken)
            _report(line, broken)
    finally:
        server.destroy()
    return 1 if failures else 0


async def _pooler_scenario(
    server: FaultServer, scenario: str, clients: int, seconds: float
) -> Figures:
    with (
        PgBouncer(server.port, pool_size=PGBOUNCER_POOL_SIZE) as pgbouncer,
        FaultProxy(upstream_port=pgbouncer.port) as proxy,
    ):
        url = pgbouncer.app_url(port=proxy.port)
        async with running_service(url, env=POOLER_ENV) as service:
            return await run_scenario(
                scenario,
                server,
                proxy,
                service.base_url,
                clients=clients,
                seconds=seconds,
                fault_at=seconds / 3,
                pgbouncer=pgbouncer,
            )


async def _load(server: FaultServer, clients: int, seconds: float) -> LoadFigures:
    with PgBouncer(server.port, pool_size=LOAD_PGBOUNCER_POOL_SIZE) as pgbouncer:
        env = {"DATABASE_POOL_SIZE": str(LOAD_POOL_SIZE)}
        async with running_services(pgbouncer, LOAD_SERVICES, env) as services:
            return await run_load(
                server,
                pgbouncer,
                services,
                pool_size=LOAD_POOL_SIZE,
                clients=clients,
                seconds=seconds,
            )


def main() -> None:
    """Parse the command line and run the soak."""
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="run the scenarios through a transaction-mode PgBouncer, then the load scenario",
    )
    pooler_scenarios = [*POOLER_FAULTS, LOAD_SCENARIO]
    parser.add_argument(
        "--scenario",
        action="append",
        choices=[*FAULTS, *pooler_scenarios],
        dest="scenarios",
    )
    args = parser.parse_args()
    available = pooler_scenarios if args.pgbouncer else list(FAULTS)
    scenarios: list[str] = args.scenarios or available
    wrong = [scenario for scenario in scenarios if scenario not in available]
    if wrong:
        mode = "without" if args.pgbouncer else "with"
        parser.error(f"{', '.join(wrong)}: run {mode} --pgbouncer")
    run = soak_pgbouncer if args.pgbouncer else soak
    sys.exit(asyncio.run(run(scenarios, args.clients, args.seconds)))


if __name__ == "__main__":
    main()
