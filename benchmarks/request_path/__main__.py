"""`python -m benchmarks.request_path`: the request path of one app shape on five layers.

First a short pass counts each variant's PostgreSQL round trips through a proxy;
then every variant is timed in-process, in interleaved rounds whose order is
shuffled from a printed seed; `--http` adds a pass over real HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence

import asyncpg
from sqlalchemy.engine import URL, make_url

from app.database.testing import create_test_database, drop_test_database
from benchmarks.exits import clean_exits

from .provenance import header
from .real_http import over_http
from .report import Cell, RoundTrips, http_table, timing_table, trace_lines
from .roundtrips import COUNTED, count_round_trips
from .shape import COUNT_BY_VARIANT, CREATE_TABLE, FILL_TABLE
from .timing import CONCURRENCIES, in_process, measure_rounds
from .variants import REFERENCE, VARIANTS, Variant

URL_VARIABLE = "BENCH_DATABASE_URL"
DEFAULT_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/bench_request"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    names = [variant.name for variant in VARIANTS]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.request_path",
        description=f"Throughput, latency and PostgreSQL round trips of one FastAPI app shape "
        f"on five session layers (server from {URL_VARIABLE}, default {DEFAULT_URL}).",
    )
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="requests per batch at concurrency 32 (default 2000); a quarter at concurrency 1",
    )
    parser.add_argument("--seed", type=int, help="seed of the order and the load (default random)")
    parser.add_argument(
        "--only", nargs="+", choices=names, metavar="VARIANT", help=f"among {', '.join(names)}"
    )
    parser.add_argument(
        "--http", action="store_true", help="also time each variant under uvicorn (slower)"
    )
    options = parser.parse_args(argv)
    for name in ("rounds", "requests"):
        if getattr(options, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if options.seed is None:
        options.seed = random.randrange(10**6)
    return options


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
    """Every 201 a variant answered must be a row in the table, read by a new connection."""
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


async def run(options: argparse.Namespace, variants: list[Variant]) -> tuple[str, ...]:
    """Create the database, run the passes, check the writes, drop it; return the tables."""
    base = make_url(os.environ.get(URL_VARIABLE) or DEFAULT_URL)
    url = base.set(database=f"{base.database or 'bench_request'}_{os.getpid()}")
    rng = random.Random(options.seed)
    posted: Counter[str] = Counter()
    created: list[URL] = []
    try:
        server_version = await create_schema(url, created)
        print(f"database: {url.database} (dropped at the end)", file=sys.stderr)
        round_trips: dict[str, RoundTrips] = {}
        # Half a timed batch: enough to see connections come and go under load.
        loaded = max(1, options.requests // 2)
        for variant in variants:
            round_trips[variant.name] = await count_round_trips(variant, url, loaded, rng, posted)
        async with in_process(variants, url) as senders:
            cells = await measure_rounds(senders, options.rounds, options.requests, rng, posted)
        http_cells: list[Cell] = []
        if options.http:
            async with over_http(variants, url) as (senders, servers):
                http_cells = await measure_rounds(
                    senders,
                    options.rounds,
                    options.requests,
                    rng,
                    posted,
                    cpu_seconds=lambda name: servers[name].cpu_seconds(),
                )
        await check_committed(url, posted)
    finally:
        for created_url in created:
            await drop_test_database(created_url)
    sections = [
        f"PostgreSQL {server_version}, database {url.database}",
        "",
        timing_table(cells, REFERENCE, round_trips),
        "",
        f"Round trips per request over {COUNTED} sequential GETs, then {COUNTED} POSTs, "
        f"through the proxy after a warm-up, then over {loaded} mixed requests at "
        f"c={max(CONCURRENCIES)} (which also give the new connections at that concurrency); "
        "the sequence of one more GET and POST:",
        trace_lines(round_trips, max(CONCURRENCIES)),
    ]
    if http_cells:
        sections += [
            "",
            "Real HTTP (uvicorn per variant, httpx in this process):",
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
    variants, skipped = [], []
    for variant in VARIANTS:
        if options.only is None or variant.name in options.only:
            reason = variant.missing()
            if reason is None:
                variants.append(variant)
            else:
                skipped.append(f"{variant.name}: {reason}")
    print("\n".join(header(argv, options, skipped)), flush=True)
    if not variants:
        print("benchmarks.request_path: no variant left to run", file=sys.stderr)
        return 2
    with clean_exits("benchmarks.request_path", URL_VARIABLE, DEFAULT_URL):
        sections = asyncio.run(run(options, variants))
    print("\n".join(sections))
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
