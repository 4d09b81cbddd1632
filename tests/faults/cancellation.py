"""Cancel units of work at seeded random phases, then check that nothing leaked (C-01..C-03).

The driver of tests/faults/test_cancellation.py, and a soak run of its own:
`python -m tests.faults.cancellation --iterations 1000 --url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres`
(for psycopg: `TEST_DRIVER=psycopg` and a `postgresql+psycopg://` URL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from app.database import DatabaseConfigError, DatabaseSessionManager
from app.database._config import parse_async_url
from app.database.testing import create_test_database, drop_test_database
from benchmarks.request_path.pgbouncer import PgBouncer
from tests.drivers import DRIVER, DRIVERNAME
from tests.faults.cancel_frontends import STYLES, Registry, front_end, serving
from tests.faults.cancel_invariants import Sampler, StyleReport, check_after
from tests.faults.cancel_noise import collected_garbage_warnings, collecting_noise, split_noise
from tests.faults.cancel_phases import PHASES, Iteration, phase_probe
from tests.faults.cancel_workload import (
    BETWEEN_SECONDS,
    COMMIT_SECONDS,
    POOL_CAPACITY,
    STATEMENT_SECONDS,
    connections_held,
    create_schema,
    open_manager,
)
from tests.postgres import asyncpg_dsn, checked_out

FAIL_RATE = 0.2  # units of work that raise after writing, so their cleanup rolls back
AT_NEXT_AWAIT = 0.3  # share of targeted cancellations fired at the phase's first await

# How long after its phase starts a targeted cancellation fires (uniform up to this).
# "any" arms at the start with a delay spanning the whole unit of work.
OFFSET_MAX = {
    "checkout": 0.005,
    "ping": 0.0005,
    "begin": 0.0005,
    "statement": STATEMENT_SECONDS,
    "between": BETWEEN_SECONDS,
    "commit": COMMIT_SECONDS,
    "close": 0.0,
    "any": 0.12,
}


def _plan(style: str, number: int, rng: random.Random) -> Iteration:
    target = rng.choice((*PHASES, "any"))
    longest = OFFSET_MAX[target]
    offset = 0.0 if rng.random() < AT_NEXT_AWAIT else rng.uniform(0, longest)
    fail = rng.random() < FAIL_RATE
    # A session that commits gives its connection back inside commit(), with no await
    # left to cancel: the close phase is the ROLLBACK of a unit of work that raised.
    # And one that raises never reaches COMMIT.
    fail = {"close": True, "commit": False}.get(target, fail)
    return Iteration(
        style=style,
        number=number,
        target=target,
        offset=offset,
        fail=fail,
        hold_pool=target == "checkout",
    )


@contextlib.asynccontextmanager
async def _pool_held(engine: AsyncEngine, release_after: float) -> AsyncIterator[None]:
    """Check out every pooled connection, and give them back after `release_after` s."""
    async with connections_held(engine, POOL_CAPACITY) as release:
        timer = asyncio.get_running_loop().call_later(release_after, release.set)
        try:
            yield
        finally:
            timer.cancel()


async def _settled(manager: DatabaseSessionManager, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not checked_out(manager):
            return True
        await asyncio.sleep(0.005)
    return checked_out(manager) == 0


async def run_style(
    manager: DatabaseSessionManager,
    style: str,
    iterations: int,
    seed: int,
    dsn: str,
    application_name: str,
) -> StyleReport:
    """Run and cancel `iterations` units of work in `style`, then check every invariant.

    `manager` must be open on a database holding the pairs schema, with `application_name`.
    """
    rng = random.Random(f"{seed}:{style}")
    report = StyleReport(style=style, seed=seed, iterations=iterations)
    registry: Registry = {}
    plans = [_plan(style, number, rng) for number in range(iterations)]
    release_after = [rng.uniform(0, 2 * OFFSET_MAX["checkout"]) for _ in plans]

    def on_invalidate(*_: Any) -> None:
        report.invalidated += 1

    event.listen(manager.engine.sync_engine, "invalidate", on_invalidate)
    sampler = Sampler(dsn, application_name)
    sampling = asyncio.create_task(sampler.run())
    started = time.monotonic()
    try:
        with phase_probe(manager.engine), serving(manager):
            async with front_end(style, registry) as send:
                for iteration, hold_for in zip(plans, release_after, strict=True):
                    registry[(style, iteration.number)] = iteration
                    if iteration.hold_pool:
                        async with _pool_held(manager.engine, hold_for):
                            await send(manager, iteration)
                    else:
                        await send(manager, iteration)
                    if checked_out(manager):
                        report.returned_early += 1
                    if not await _settled(manager, 1.0):
                        report.leaky_iterations += 1
                    report.tally(iteration)
    finally:
        sampler.stop()
        await sampling
        event.remove(manager.engine.sync_engine, "invalidate", on_invalidate)
    report.seconds = time.monotonic() - started
    report.idle_in_transaction_max = sampler.max_idle_in_transaction
    report.backends_max = sampler.max_backends
    await check_after(manager, report, dsn, application_name, plans)
    return report


async def soak(
    server: URL, iterations: int, seed: int, styles: list[str], *, pgbouncer: bool = False
) -> int:
    """Run every style on a database of its own; print one line each; 1 if a promise broke.

    With `pgbouncer`, the units of work go through a private PgBouncer in transaction
    mode (`transaction_pooler=True`), whose server connections are the backends checked.
    """
    url = server.set(database=f"h2_cancel_{os.getpid()}_{secrets.token_hex(3)}")
    application_name = f"h2-cancel-{os.getpid()}"
    dsn = asyncpg_dsn(url)
    broken = False
    await create_test_database(url)
    try:
        await create_schema(dsn)
        async with _deployment(url, pgbouncer) as units_url:
            broken = await _soak_styles(
                units_url, iterations, seed, styles, dsn, application_name, pgbouncer
            )
    finally:
        # Anything abandoned late (found by a later collection, or at the drop).
        with collecting_noise() as trailing:
            await drop_test_database(url)
            garbage = collected_garbage_warnings()
    late, known = split_noise(trailing + garbage)
    print(f"[after all styles] warnings={len(late)} asyncpg_connect_noise={known}", flush=True)
    return 1 if _print_violations(late) or broken else 0


@contextlib.asynccontextmanager
async def _deployment(url: URL, pgbouncer: bool) -> AsyncIterator[URL]:
    """`url` itself, or `url` through a PgBouncer of the run's own."""
    if not pgbouncer:
        yield url
        return
    with PgBouncer(url, pool_size=POOL_CAPACITY) as pooler:
        yield pooler.url(url)


async def _soak_styles(
    url: URL,
    iterations: int,
    seed: int,
    styles: list[str],
    dsn: str,
    application_name: str,
    pgbouncer: bool,
) -> bool:
    broken = False
    for style in styles:
        with collecting_noise() as noise:
            manager = open_manager(url, application_name, transaction_pooler=pgbouncer)
            try:
                report = await run_style(manager, style, iterations, seed, dsn, application_name)
            finally:
                await manager.close()
            # Inside the collection: what the collector finds gets logged too.
            garbage = collected_garbage_warnings()
        report.noise, report.asyncpg_connect_noise = split_noise(noise + garbage)
        print(("[pgbouncer] " if pgbouncer else "") + report.line(), flush=True)
        broken = _print_violations(report.violations()) or broken
    return broken


def _print_violations(violations: list[str]) -> bool:
    for violation in violations:
        print(f"  VIOLATION {violation}", flush=True)
    return bool(violations)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tests.faults.cancellation")
    parser.add_argument("--iterations", type=int, default=1000, help="per style")
    parser.add_argument(
        "--url",
        default=f"{DRIVERNAME}://postgres@127.0.0.1:5432/postgres",
        help="the server to use; the run creates and drops a database h2_cancel_<pid>_<hex>",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--styles", default=",".join(STYLES), help="comma-separated")
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="through a private PgBouncer in transaction mode, with transaction_pooler=True",
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    styles = [style for style in args.styles.split(",") if style]
    unknown = [style for style in styles if style not in STYLES]
    if unknown:
        parser.error(f"unknown style(s) {unknown}: choose from {', '.join(STYLES)}")
    try:
        url = parse_async_url(args.url)  # as init() will read it
    except DatabaseConfigError as error:
        parser.error(str(error))
    driver = url.get_driver_name()
    if driver != DRIVER:
        # The connect_args (application_name) and the phase probe follow TEST_DRIVER.
        parser.error(
            f"--url uses {driver}, TEST_DRIVER is {DRIVER}: set TEST_DRIVER={driver}, "
            f"or use a {DRIVERNAME}:// URL"
        )
    return asyncio.run(soak(url, args.iterations, seed, styles, pgbouncer=args.pgbouncer))


if __name__ == "__main__":
    sys.exit(main())
