"""The soak tier (`make soak`): each fault scenario for about a minute under 50 writers.

Prints one line of figures per scenario and exits non-zero if any promise broke.
Run it on a quiet machine; the figures in the README came from it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from tests.faults.proxy import FaultProxy
from tests.faults.scenarios import FAULTS, Figures, run_scenario
from tests.faults.server import FaultServer
from tests.faults.service import running_service


def broken_promises(figures: Figures) -> list[str]:
    """The promises a run broke, by name; empty when all held."""
    outcome = figures.outcome
    checks = {
        "LOST=0": outcome.lost == 0,
        "PHANTOM=0": outcome.phantom == 0,
        "no failures after ready": figures.failed_after_ready == 0,
        "recovered": figures.recovery_seconds is not None,
        "ambiguous only where an answer to COMMIT was lost": (
            outcome.ambiguous == figures.acks_lost
            or figures.scenario not in ("cut before COMMIT", "ack lost after COMMIT")
        ),
        "nothing checked out after": figures.checked_out_after == 0,
        "no idle transaction after": figures.idle_in_transaction_after == 0,
    }
    return [name for name, held in checks.items() if not held]


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
            suffix = f" | BROKEN: {', '.join(broken)}" if broken else ""
            print(figures.line() + suffix, flush=True)
    finally:
        server.destroy()
    return 1 if failures else 0


def main() -> None:
    """Parse the command line and run the soak."""
    parser = argparse.ArgumentParser(prog="python -m tests.faults.soak", description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--scenario", action="append", choices=list(FAULTS), dest="scenarios")
    args = parser.parse_args()
    sys.exit(asyncio.run(soak(args.scenarios or list(FAULTS), args.clients, args.seconds)))


if __name__ == "__main__":
    main()
