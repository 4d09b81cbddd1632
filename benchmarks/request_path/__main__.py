"""`python -m benchmarks.request_path`: the request path of one app shape on five layers.

Each layer (variant) runs on each driver (asyncpg, psycopg), direct to PostgreSQL
or through a private PgBouncer in transaction mode: a configuration. First a short
pass counts each configuration's PostgreSQL round trips through a proxy; then every
configuration is timed in-process, in interleaved rounds whose order is shuffled
from a printed seed; `--http` adds a pass over real HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import asyncpg
from sqlalchemy.engine import URL, make_url

from app.database.testing import create_test_database, drop_test_database
from benchmarks.exits import clean_exits

from . import pgbouncer
from .provenance import header
from .real_http import over_http
from .report import (
    RoundTrips,
    across,
    http_table,
    ours_vs_others,
    targets,
    timing_table,
    trace_lines,
)
from .roundtrips import COUNTED, count_round_trips
from .shape import COUNT_BY_VARIANT, CREATE_TABLE, FILL_TABLE, POOL_CAPACITY
from .timing import HIGH, WARM_UP, in_process, measure_rounds
from .variants import DEPLOYMENTS, DRIVERS, POOLED, REFERENCE, VARIANTS, Configuration

URL_VARIABLE = "BENCH_DATABASE_URL"
DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/bench_request"
ROUNDS = 7
REQUESTS = 1000


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated subset of `allowed`, in `allowed`'s order."""

    def parse(value: str) -> list[str]:
        given = [name.strip() for name in value.split(",") if name.strip()]
        unknown = [name for name in given if name not in allowed]
        if unknown or not given:
            raise argparse.ArgumentTypeError(
                f"{value!r}: a comma-separated list among {','.join(allowed)}"
            )
        return [name for name in allowed if name in given]

    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    names = [variant.name for variant in VARIANTS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.request_path",
        description="Throughput, latency and PostgreSQL round trips of one FastAPI app shape "
        "on five session layers, two drivers, direct and through PgBouncer "
        f"(server from {URL_VARIABLE}, default {DEFAULT_URL}).",
    )
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help=f"interleaved rounds (default {ROUNDS})"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=REQUESTS,
        help=f"requests per batch at concurrency 32 (default {REQUESTS}); "
        "a quarter at concurrency 1",
    )
    parser.add_argument("--seed", type=int, help="seed of the order and the load (default random)")
    parser.add_argument(
        "--only", nargs="+", choices=names, metavar="VARIANT", help=f"among {', '.join(names)}"
    )
    parser.add_argument(
        "--drivers",
        type=_names(DRIVERS),
        default=list(DRIVERS),
        help=f"comma-separated, among {','.join(DRIVERS)} (default both)",
    )
    parser.add_argument(
        "--deployments",
        type=_names(DEPLOYMENTS),
        default=list(DEPLOYMENTS),
        help="comma-separated: direct (to PostgreSQL), pgbouncer (a private PgBouncer in "
        "transaction mode in front of it) (default both)",
    )
    parser.add_argument(
        "--warm-up",
        type=int,
        default=WARM_UP,
        help=f"calls per configuration at c=32 each time it is opened, before it is timed "
        f"or counted under load (default {WARM_UP})",
    )
    parser.add_argument(
        "--counted",
        type=int,
        default=COUNTED,
        help=f"sequential GETs, and POSTs, counted through the proxy per configuration "
        f"(default {COUNTED})",
    )
    parser.add_argument(
        "--http", action="store_true", help="also time each configuration under uvicorn (slower)"
    )
    options = parser.parse_args(argv)
    for name in ("rounds", "requests", "warm_up", "counted"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if options.seed is None:
        options.seed = random.randrange(10**6)
    return options


def select(options: argparse.Namespace) -> tuple[list[Configuration], list[str]]:
    """The configurations to run, in report order, and a note per one skipped."""
    skipped: list[str] = []
    deployments = list(options.deployments)
    if POOLED in deployments and (reason := pgbouncer.missing()) is not None:
        deployments.remove(POOLED)
        skipped.append(f"deployment {POOLED}: {reason}")
    configurations = []
    for variant in VARIANTS:
        if options.only is not None and variant.name not in options.only:
            continue
        if (reason := variant.missing()) is not None:
            skipped.append(f"{variant.name}: {reason}")
            continue
        for driver in options.drivers:
            if (reason := variant.missing(driver)) is not None:
                skipped.append(f"{variant.name} on {driver}: {reason}")
                continue
            configurations += [Configuration(variant, driver, d) for d in deployments]
    # The report's order: by deployment, then driver, then variant.
    configurations.sort(key=lambda c: (DEPLOYMENTS.index(c.deployment), DRIVERS.index(c.driver)))
    return configurations, skipped


async def create_schema(url: URL, created: list[URL]) -> str:
    """Create database `url` with the benchmark's table; return the server's version."""
    await create_test_database(url)
    created.append(url)  # only now is it ours to drop
    connection = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        await connection.execute(CREATE_TABLE)
        await connection.execute(FILL_TABLE)
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


async def check_committed(url: URL, posted: Counter[str]) -> None:
    """Every 201 a configuration answered must be a row in the table, read by a new connection."""
    connection = await asyncpg.connect(_asyncpg_dsn(url))
    try:
        stored = {row[0]: row[1] for row in await connection.fetch(COUNT_BY_VARIANT)}
    finally:
        await connection.close()
    for name, count in posted.items():
        if stored.get(name, 0) != count:
            raise RuntimeError(
                f"{name} answered 201 to {count} POSTs, but stored {stored.get(name, 0)} rows"
            )


async def run(options: argparse.Namespace, configurations: list[Configuration]) -> tuple[str, ...]:
    """Create the database, run the passes, check the writes, drop it; return the tables."""
    base = make_url(os.environ.get(URL_VARIABLE) or DEFAULT_URL)
    url = base.set(database=f"{base.database or 'bench_request'}_{os.getpid()}")
    rng = random.Random(options.seed)
    posted: Counter[str] = Counter()
    created: list[URL] = []
    try:
        server_version = await create_schema(url, created)
        print(f"database: {url.database} (dropped at the end)", file=sys.stderr)
        with ExitStack() as stack:
            endpoints = {"direct": url}
            if any(conf.pooled for conf in configurations):
                bouncer = pgbouncer.PgBouncer(url, pool_size=POOL_CAPACITY)
                stack.callback(bouncer.destroy)
                await asyncio.to_thread(bouncer.start)
                endpoints[POOLED] = bouncer.url(url)
                print(f"pgbouncer: 127.0.0.1:{bouncer.port} (stopped at the end)", file=sys.stderr)

            def url_for(conf: Configuration) -> URL:
                return endpoints[conf.deployment]

            round_trips: dict[Configuration, RoundTrips] = {}
            # Half a timed batch: enough to see connections come and go under load.
            loaded = max(1, options.requests // 2)
            for conf in configurations:
                round_trips[conf] = await count_round_trips(
                    conf,
                    url_for(conf),
                    counted=options.counted,
                    loaded=loaded,
                    warm_up=options.warm_up,
                    rng=rng,
                    posted=posted,
                )
            print("round trips counted", file=sys.stderr, flush=True)
            measure = functools.partial(
                measure_rounds,
                configurations,
                rounds=options.rounds,
                requests=options.requests,
                warm_up=options.warm_up,
                rng=rng,
                posted=posted,
            )
            cells = await measure(in_process(url_for))
            http_cells = await measure(over_http(url_for)) if options.http else []
        await check_committed(url, posted)
    finally:
        for created_url in created:
            await drop_test_database(created_url)
    sections = [
        f"PostgreSQL {server_version}, database {url.database}",
        "",
        timing_table(cells, REFERENCE, round_trips),
        "",
        f"Round trips per request over {options.counted} sequential GETs, then "
        f"{options.counted} POSTs, through the proxy after a warm-up, then over {loaded} "
        f"mixed requests at c={HIGH} (which also give the new connections at that "
        "concurrency); the sequence of one more GET and POST:",
        trace_lines(round_trips, HIGH),
    ]
    comparisons = ours_vs_others(cells)
    if comparisons:
        sections += ["", "Ours over the other layers, round by round:", "", comparisons]
    drivers_and_deployments = across(cells)
    if drivers_and_deployments:
        sections += [
            "",
            "Each variant across drivers and deployments, round by round:",
            "",
            drivers_and_deployments,
        ]
    peers = [v.name for v in VARIANTS if v.peer is not None]
    checked = targets(cells, peers, HIGH)
    if checked:
        sections += ["", "Targets (median of the per-round ratios):", *checked]
    if http_cells:
        sections += [
            "",
            "Real HTTP (uvicorn per configuration, httpx in this process):",
            "",
            http_table(http_cells, REFERENCE),
        ]
    return tuple(sections)


def _asyncpg_dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    started = time.perf_counter()
    configurations, skipped = select(options)
    print("\n".join(header(argv, options, configurations, skipped)), flush=True)
    if not configurations:
        print("benchmarks.request_path: no configuration left to run", file=sys.stderr)
        return 2
    with clean_exits("benchmarks.request_path", URL_VARIABLE, DEFAULT_URL):
        sections = asyncio.run(run(options, configurations))
    print("\n".join(sections))
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
