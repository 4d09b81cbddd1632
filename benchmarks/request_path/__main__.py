"""`python -m benchmarks.request_path`: the request path of one app shape on six layers.

Each layer (variant) runs on each driver (asyncpg, psycopg), direct to PostgreSQL,
through a private PgBouncer in transaction mode, or on a private primary with a hot
standby (`replica`): a configuration. First a short pass counts each
configuration's PostgreSQL round trips through a proxy; then every configuration is
timed in-process, in interleaved rounds whose order is shuffled from a printed
seed; `--http` adds a pass over real HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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

from . import pgbouncer, replica
from .load import GET_ONLY, GET_SHARE
from .provenance import header
from .real_http import over_http
from .report import (
    RoundTrips,
    across,
    http_table,
    instrumentation,
    over_others,
    read_targets,
    routing,
    server_stacks,
    targets,
    timing_table,
    trace_lines,
)
from .roundtrips import COUNTED, count_round_trips
from .shape import COUNT_BY_VARIANT, CREATE_TABLE, FILL_TABLE, POOL_CAPACITY
from .timing import HIGH, WARM_UP, in_process, measure_rounds
from .variants import (
    DEPLOYMENTS,
    DRIVERS,
    OURS,
    OURS_READ,
    POOLED,
    REFERENCE,
    REPLICATED,
    SERVER_STACKS,
    VARIANTS,
    Configuration,
    Servers,
)

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
        "on six session layers, two drivers, direct, through PgBouncer and with a replica "
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
        default=[d for d in DEPLOYMENTS if d != REPLICATED],
        help="comma-separated: direct (to PostgreSQL), pgbouncer (a private PgBouncer in "
        "transaction mode in front of it), replica (a private primary and hot standby; "
        "ours and ours_read read from the standby) (default direct,pgbouncer)",
    )
    parser.add_argument(
        "--get-only",
        action="store_true",
        help="time GETs only (default: 80 %% GETs, 20 %% POSTs); the round-trip pass "
        "still counts both",
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
    if REPLICATED in deployments and (reason := replica.missing()) is not None:
        deployments.remove(REPLICATED)
        skipped.append(f"deployment {REPLICATED}: {reason}")
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


async def check_committed(urls: list[URL], posted: Counter[str]) -> None:
    """Every 201 a configuration answered must be a row in the table (on the server it
    wrote to, of `urls`), read by a new connection."""
    stored: Counter[str] = Counter()
    for url in urls:
        connection = await asyncpg.connect(_asyncpg_dsn(url))
        try:
            stored.update({row[0]: row[1] for row in await connection.fetch(COUNT_BY_VARIANT)})
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
    get_share = GET_ONLY if options.get_only else GET_SHARE
    posted: Counter[str] = Counter()
    created: list[URL] = []
    try:
        server_version = await create_schema(url, created)
        print(f"database: {url.database} (dropped at the end)", file=sys.stderr)
        with ExitStack() as stack:
            endpoints = {"direct": Servers(url)}
            written = [url]  # where the POSTs' rows are, to check them at the end
            if any(conf.pooled for conf in configurations):
                bouncer = pgbouncer.PgBouncer(url, pool_size=POOL_CAPACITY)
                stack.callback(bouncer.destroy)
                await asyncio.to_thread(bouncer.start)
                endpoints[POOLED] = Servers(bouncer.url(url))
                print(f"pgbouncer: 127.0.0.1:{bouncer.port} (stopped at the end)", file=sys.stderr)
            if any(conf.replicated for conf in configurations):
                pair = replica.ReplicaDeployment()
                stack.callback(pair.destroy)
                replica_version = await pair.start()
                endpoints[REPLICATED] = pair.servers
                written.append(pair.servers.url)
                print(
                    "replica deployment: primary 127.0.0.1:{}, standby 127.0.0.1:{}, PostgreSQL "
                    "{} (both deleted at the end)".format(*pair.ports, replica_version),
                    file=sys.stderr,
                )

            def servers_for(conf: Configuration) -> Servers:
                return endpoints[conf.deployment]

            round_trips: dict[Configuration, RoundTrips] = {}
            # Half a timed batch: enough to see connections come and go under load.
            loaded = max(1, options.requests // 2)
            for conf in configurations:
                round_trips[conf] = await count_round_trips(
                    conf,
                    servers_for(conf),
                    counted=options.counted,
                    loaded=loaded,
                    warm_up=options.warm_up,
                    rng=rng,
                    posted=posted,
                    get_share=get_share,
                )
            print("round trips counted", file=sys.stderr, flush=True)
            measure = functools.partial(
                measure_rounds,
                rounds=options.rounds,
                requests=options.requests,
                warm_up=options.warm_up,
                rng=rng,
                posted=posted,
                get_share=get_share,
            )
            cells = await measure(configurations, in_process(servers_for))
            # Each configuration once per uvicorn stack, interleaved in the same rounds.
            served = [
                dataclasses.replace(conf, server=stack)
                for conf in configurations
                for stack in SERVER_STACKS
            ]
            http_cells = await measure(served, over_http(servers_for)) if options.http else []
            # Before the ExitStack deletes the replica deployment's primary.
            await check_committed(written, posted)
    finally:
        for created_url in created:
            await drop_test_database(created_url)
    load = "GET-only" if options.get_only else "mixed"
    sections = [
        f"PostgreSQL {server_version}, database {url.database}",
        "",
        timing_table(cells, REFERENCE, round_trips),
        "",
        f"Round trips per request over {options.counted} sequential GETs, then "
        f"{options.counted} POSTs, through the proxy after a warm-up, then over {loaded} "
        f"{load} requests at c={HIGH} (which also give the new connections at that "
        "concurrency); the sequence of one more GET and POST (`replica:` ran on the "
        "standby; app.database's background probes left out):",
        trace_lines(round_trips, HIGH),
    ]
    for subject, name in ((OURS, "Ours"), (OURS_READ, "ours_read")):
        comparisons = over_others(cells, subject)
        if comparisons:
            sections += ["", f"{name} over the other layers, round by round:", "", comparisons]
    instrumented = instrumentation(cells)
    if instrumented:
        sections += [
            "",
            "Instrumentation: ours with enable_telemetry() on (ours_otel) over off (ours), "
            "round by round:",
            "",
            instrumented,
        ]
    routes = routing(cells, round_trips)
    if routes:
        sections += [
            "",
            "Routing: what the session dependency and a configured replica cost, round by "
            "round (AsyncSessionDep is ours, ReadSessionDep ours_read's GET):",
            "",
            routes,
        ]
    drivers_and_deployments = across(cells)
    if drivers_and_deployments:
        sections += [
            "",
            "Each variant across drivers and deployments, round by round:",
            "",
            drivers_and_deployments,
        ]
    peers = [v.name for v in VARIANTS if v.peer is not None]
    # Issue 9's targets are for the mixed load; issue 10's for a GET through ReadSessionDep.
    if options.get_only:
        checked = read_targets(cells, round_trips, peers)
        title = "Targets for a GET through ReadSessionDep (per-round ratios, median (min-max)):"
    else:
        checked = targets(cells, peers, HIGH)
        title = "Targets (median of the per-round ratios):"
    if checked:
        sections += ["", title, *checked]
    if http_cells:
        sections += [
            "",
            "Real HTTP (uvicorn per configuration and stack, `loop` and `http` set, "
            "httpx in this process):",
            "",
            http_table(http_cells, REFERENCE),
            "",
            "uvicorn's stacks, round by round:",
            "",
            server_stacks(http_cells),
        ]
        instrumented = instrumentation(http_cells)
        if instrumented:
            sections += ["", "Instrumentation over real HTTP, round by round:", "", instrumented]
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
