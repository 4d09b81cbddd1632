"""`python -m benchmarks.isolation`: time every strategy in interleaved rounds, print a report.

Round after round, each strategy runs a batch of tests, in an order shuffled per
round from a printed seed, so that a drift of the machine's speed during the run
spreads over all strategies instead of landing on one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Sequence

import asyncpg
import sqlalchemy
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from app.database.testing import create_test_database, drop_test_database
from benchmarks.exits import clean_exits

from .report import Samples, markdown_table, overhead_line
from .schema import metadata
from .strategies import STRATEGIES, Strategy, Template

URL_VARIABLE = "BENCH_DATABASE_URL"
DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/bench_isolation"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.isolation",
        description=f"Per-test cost of test isolation strategies on PostgreSQL "
        f"(server from {URL_VARIABLE}, default {DEFAULT_URL}).",
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--tests", type=int, default=50, help="tests per strategy per round")
    parser.add_argument(
        "--template-tests", type=int, default=5, help="tests per round for template (slow)"
    )
    parser.add_argument("--seed", type=int, help="seed of the per-round order (default random)")
    options = parser.parse_args(argv)
    for name in ("rounds", "tests", "template_tests"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if options.seed is None:
        options.seed = random.randrange(10**6)
    return options


async def create_schema(url: URL, created: list[URL]) -> str:
    """Create database `url` with the benchmark's tables; return the server's version.

    `url` is appended to `created` as soon as the database exists, for the clean-up.
    """
    await create_test_database(url)
    # Only now is it ours: a name already taken (another run's, say) or a server
    # that does not answer leaves nothing for the clean-up to drop.
    created.append(url)
    # NullPool: no connection may stay open to what becomes a template database.
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(metadata.create_all)
            return str(await connection.scalar(text("SHOW server_version")))
    finally:
        await engine.dispose()


async def measure(strategies: list[Strategy], options: argparse.Namespace) -> Samples:
    """Per-test seconds of every strategy, round by round."""
    samples: Samples = {strategy.name: [] for strategy in strategies}
    order = list(strategies)
    rng = random.Random(options.seed)
    for strategy in strategies:
        await strategy.run_test()  # warm-up: first connections, statement caches
    for number in range(1, options.rounds + 1):
        started = time.perf_counter()
        rng.shuffle(order)
        for strategy in order:
            tests = options.template_tests if isinstance(strategy, Template) else options.tests
            # Collect now, so the last batch's garbage is not billed to this one.
            gc.collect()
            batch = []
            for _ in range(tests):
                before = time.perf_counter()
                await strategy.run_test()
                batch.append(time.perf_counter() - before)
            samples[strategy.name].append(batch)
        print(
            f"round {number}/{options.rounds} in {time.perf_counter() - started:.1f} s: "
            + ", ".join(strategy.name for strategy in order),
            file=sys.stderr,
        )
    return samples


async def run(argv: Sequence[str]) -> str:
    """Create the databases, measure, drop the databases; return the report."""
    options = parse_args(argv)
    started = time.perf_counter()
    base = make_url(os.environ.get(URL_VARIABLE) or DEFAULT_URL)
    prefix = f"{base.database or 'bench_isolation'}_{os.getpid()}"
    strategies = [kind(base.set(database=f"{prefix}_{kind.name}")) for kind in STRATEGIES]
    created: list[URL] = []
    try:
        for strategy in strategies:
            server_version = await create_schema(strategy.url, created)
        for strategy in strategies:
            await strategy.start()
        samples = await measure(strategies, options)
        for strategy in strategies:
            await strategy.finish()
    finally:
        for strategy in strategies:
            await strategy.close()
        for url in created:
            await drop_test_database(url)
    command = shlex.join(["python", "-m", "benchmarks.isolation", *argv])
    return "\n".join(
        [
            f"command: {command}",
            f"seed: {options.seed} (pass --seed {options.seed} to repeat this order)",
            f"versions: Python {platform.python_version()}, SQLAlchemy {sqlalchemy.__version__}"
            f", asyncpg {asyncpg.__version__}, PostgreSQL {server_version}",
            f"rounds: {options.rounds}, each {options.tests} tests per strategy"
            f" ({options.template_tests} for template), in a shuffled order",
            "",
            markdown_table(samples, reference="rollback"),
            "",
            overhead_line(samples, isolated="rollback", baseline="bare"),
            f"wall time: {time.perf_counter() - started:.0f} s",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    with clean_exits("benchmarks.isolation", URL_VARIABLE, DEFAULT_URL):
        print(asyncio.run(run(sys.argv[1:] if argv is None else argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
