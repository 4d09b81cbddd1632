"""Smoke tests of `python -m benchmarks.request_path` and of its round-trip proxy.

Tiny sizes, in the main venv, where the peer libraries and psycopg-pool are not
installed: they prove the benchmark runs every driver and deployment, reports and
cleans up, and count round trips that do not depend on timing; the figures come
from a full run (`make bench`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import socket

import asyncpg
import pytest
from sqlalchemy.engine import URL

from benchmarks.request_path.__main__ import parse_args
from benchmarks.request_path.proxy import RoundTripProxy
from tests.paths import REPO_ROOT
from tests.postgres import asyncpg_dsn
from tests.subprocesses import Result, run_python

ROUND_TRIPS = "round trips GET / POST"
TINY = ("--rounds", "1", "--requests", "20", "--warm-up", "20", "--counted", "5")
PEERS = (
    ("advanced_alchemy", "advanced-alchemy"),
    ("fastapi_async_sqlalchemy", "fastapi-async-sqlalchemy"),
)
PSYCOPG_POOL = importlib.util.find_spec("psycopg_pool") is not None
# Round trips of one sequential GET / POST that depend on no timing. asyncpg's
# statement cache is warm after the first use on a connection (pools hand out the
# connection used last); behind PgBouncer nothing is cached: asyncpg prepares the
# statement (Parse, Describe, Flush) and binds it in a second round trip, psycopg
# sends Parse, Bind and Execute in one. psycopg direct is left out: it prepares a
# statement on its 6th execution, which may fall in the counted calls.
EXPECTED_ROUND_TRIPS = {
    ("raw", "asyncpg", "direct"): "2 / 2",  # the statement, the pool's reset
    ("raw", "asyncpg", "pgbouncer"): "3 / 3",  # prepare, the statement, the reset
    ("seed", "asyncpg", "direct"): "6 / 6",  # pre-ping BEGIN; ; ROLLBACK, then 3
    ("ours", "asyncpg", "direct"): "3 / 3",  # BEGIN, the statement, COMMIT
    ("ours", "asyncpg", "pgbouncer"): "4 / 4",  # BEGIN, prepare, the statement, COMMIT
    ("ours", "psycopg", "pgbouncer"): "3 / 3",  # BEGIN, the statement, COMMIT
}


def _whole(counts: str) -> str:
    """'3.20 / 3' as '3 / 3': a counted call that met a connection whose statement cache
    the short warm-up left cold pays one prepare more (direct asyncpg); a regression of
    a whole round trip per request still shows."""
    return " / ".join(str(math.floor(float(count))) for count in counts.split(" / "))


async def run_benchmark(database_url: URL, *args: str) -> Result:
    # The suite's server under the benchmark's own base name: the run appends its
    # pid, so what it creates is `bench_request_<pid>`, and it prints that name.
    url = database_url.set(database="bench_request")
    env = {**os.environ, "BENCH_DATABASE_URL": url.render_as_string(hide_password=False)}
    return await run_python("-m", "benchmarks.request_path", *args, cwd=REPO_ROOT, env=env)


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def timing_rows(stdout: str) -> dict[tuple[str, str, str, int], dict[str, str]]:
    """The timing table's rows, by (variant, driver, via, c), each by column name."""
    lines = stdout.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if line.startswith("| via | driver | c | variant |")),
        None,
    )
    assert start is not None, f"no table:\n{stdout}"
    header = cells(lines[start])
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        row = dict(zip(header, cells(line), strict=True))
        rows[row["variant"], row["driver"], row["via"], int(row["c"])] = row
    return rows


async def test_benchmark_runs_both_drivers_direct_and_through_pgbouncer(
    database_url: URL, observer: asyncpg.Connection
) -> None:
    """A tiny run of every driver and deployment: a row per configuration and concurrency,
    the round trips each should have, skipped peers named, and nothing left behind."""
    result = await run_benchmark(database_url, *TINY)

    assert result.returncode == 0, result.output
    rows = timing_rows(result.stdout)
    variants = ["seed", "ours"] + (["raw"] if PSYCOPG_POOL else [])
    expected = {
        (variant, driver, via, c)
        for variant in variants
        for driver in ("asyncpg", "psycopg")
        for via in ("direct", "pgbouncer")
        for c in (1, 32)
    }
    expected |= {("raw", "asyncpg", via, c) for via in ("direct", "pgbouncer") for c in (1, 32)}
    assert expected <= set(rows), result.stdout
    for (variant, driver, via, c), row in rows.items():
        assert re.fullmatch(r"\d+(\.\d+)? / \d+(\.\d+)?", row[ROUND_TRIPS]), result.stdout
        if (variant, driver, via) in EXPECTED_ROUND_TRIPS:
            assert _whole(row[ROUND_TRIPS]) == EXPECTED_ROUND_TRIPS[variant, driver, via], (
                f"{variant} {driver} {via} c={c}:\n{result.stdout}"
            )
    assert "PgBouncer 1." in result.stdout  # its version, in the header
    if not PSYCOPG_POOL:
        assert "skipped raw on psycopg: psycopg-pool is not installed" in result.stdout
    for variant, distribution in PEERS:
        if importlib.util.find_spec(variant) is None:
            assert f"skipped {variant}: {distribution} is not installed" in result.stdout
            assert not any(key[0] == variant for key in rows), result.stdout
    assert "Each variant across drivers and deployments" in result.stdout
    assert "ours on psycopg within 15% of ours on asyncpg, direct, c=32:" in result.stdout

    database = re.search(r"database (bench_request_\d+)", result.stdout)
    assert database, result.stdout
    left = await observer.fetchval(
        "SELECT count(*) FROM pg_database WHERE datname = $1", database.group(1)
    )
    assert left == 0
    bouncer = re.search(r"pgbouncer: 127\.0\.0\.1:(\d+) \(stopped at the end\)", result.stderr)
    assert bouncer, result.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(bouncer.group(1))), timeout=2).close()


def test_axes_are_comma_separated_and_checked(capsys: pytest.CaptureFixture[str]) -> None:
    """`--drivers` and `--deployments` take a comma-separated subset, in the report's order."""
    options = parse_args(["--drivers", "psycopg,asyncpg", "--deployments", "pgbouncer"])
    assert (options.drivers, options.deployments) == (["asyncpg", "psycopg"], ["pgbouncer"])
    with pytest.raises(SystemExit):
        parse_args(["--drivers", "asyncpg,psycopg2"])
    assert "among asyncpg,psycopg" in capsys.readouterr().err


async def test_proxy_counts_each_query_as_one_round_trip(database_url: URL) -> None:
    """A prepared query and a simple one each count once; opening a connection counts none."""
    proxy = RoundTripProxy(database_url.host or "127.0.0.1", database_url.port or 5432)
    port = await proxy.start()
    try:
        url = database_url.set(host="127.0.0.1", port=port)
        connection = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await connection.fetchval("SELECT $1::int", 1)  # prepares: one more round trip
            proxy.reset(record=True)
            assert await connection.fetchval("SELECT $1::int", 2) == 2
            await connection.execute("SELECT 3")
            assert (proxy.round_trips, proxy.trace) == (2, ["SELECT", "SELECT 3"])
        finally:
            await connection.close()
        assert proxy.connections == 0, "reset() zeroes the count of connections opened"
    finally:
        await proxy.close()


async def test_proxy_counts_asyncpg_prepare_ended_by_flush(database_url: URL) -> None:
    """asyncpg prepares with Parse, Describe and Flush (no Sync), then waits: a round trip."""
    proxy = RoundTripProxy(database_url.host or "127.0.0.1", database_url.port or 5432)
    port = await proxy.start()
    try:
        url = database_url.set(host="127.0.0.1", port=port)
        connection = await asyncpg.connect(asyncpg_dsn(url), statement_cache_size=0)
        try:
            proxy.reset(record=True)
            assert await connection.fetchval("SELECT $1::int", 2) == 2
            assert (proxy.round_trips, proxy.trace) == (2, ["prepare SELECT", "SELECT"])
        finally:
            await connection.close()
    finally:
        await proxy.close()
