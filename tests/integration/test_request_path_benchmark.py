"""Smoke tests of `python -m benchmarks.request_path` and of its round-trip proxy.

Tiny sizes, in the main venv, where the peer libraries are not installed: they
prove the benchmark runs, reports and cleans up, not what it measures; the
figures come from a full run (`make bench`).
"""

from __future__ import annotations

import importlib.util
import os
import re

import asyncpg
import pytest
from sqlalchemy.engine import URL

from benchmarks.request_path.proxy import RoundTripProxy
from tests.paths import REPO_ROOT
from tests.postgres import asyncpg_dsn
from tests.subprocesses import Result, run_python

ROUND_TRIPS = "round trips GET / POST"


async def run_benchmark(database_url: URL, *args: str) -> Result:
    # The suite's server under the benchmark's own base name: the run appends its
    # pid, so what it creates is `bench_request_<pid>`, and it prints that name.
    url = database_url.set(database="bench_request")
    env = {**os.environ, "BENCH_DATABASE_URL": url.render_as_string(hide_password=False)}
    return await run_python("-m", "benchmarks.request_path", *args, cwd=REPO_ROOT, env=env)


def cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip("|").split("|")]


def table_cell(stdout: str, variant: str, concurrency: int, column: str) -> str:
    """The `column` cell of `variant`'s row at `concurrency` in the timing table."""
    header = re.search(r"^\| variant \| c \|.*\|$", stdout, re.M)
    row = re.search(rf"^\| {variant} \| {concurrency} \|.*\|$", stdout, re.M)
    assert header, f"no table:\n{stdout}"
    assert row, f"no row for {variant} at c={concurrency}:\n{stdout}"
    return cells(row.group())[cells(header.group()).index(column)]


async def test_benchmark_reports_raw_seed_and_ours_and_drops_its_database(
    database_url: URL, observer: asyncpg.Connection
) -> None:
    """A tiny run prints a row per variant and concurrency, with round trips, and cleans up."""
    result = await run_benchmark(
        database_url, *("--only", "raw", "seed", "ours", "--rounds", "1", "--requests", "20")
    )

    assert result.returncode == 0, result.output
    for variant in ("raw", "seed", "ours"):
        for concurrency in (1, 32):
            round_trips = table_cell(result.stdout, variant, concurrency, ROUND_TRIPS)
            assert re.fullmatch(r"\d+(\.\d+)? / \d+(\.\d+)?", round_trips), result.stdout
    database = re.search(r"database (bench_request_\d+)", result.stdout)
    assert database, result.stdout
    left = await observer.fetchval(
        "SELECT count(*) FROM pg_database WHERE datname = $1", database.group(1)
    )
    assert left == 0


async def test_benchmark_counts_one_or_two_round_trips_per_raw_get(database_url: URL) -> None:
    """Through the proxy a raw asyncpg GET is its query plus, at most, the pool's reset."""
    result = await run_benchmark(database_url, "--only", "raw", "--rounds", "1", "--requests", "4")

    assert result.returncode == 0, result.output
    get = table_cell(result.stdout, "raw", 1, ROUND_TRIPS).split(" / ")[0]
    assert get in {"1", "2"}, result.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("advanced_alchemy") is not None
    or importlib.util.find_spec("fastapi_async_sqlalchemy") is not None,
    reason="a peer library is installed here, so it would run instead of being skipped",
)
async def test_benchmark_skips_absent_peers_with_a_note(database_url: URL) -> None:
    """Without the peer libraries the run says which it skipped and why, and still succeeds."""
    result = await run_benchmark(database_url, "--rounds", "1", "--requests", "4")

    assert result.returncode == 0, result.output
    for variant, distribution in (
        ("advanced_alchemy", "advanced-alchemy"),
        ("fastapi_async_sqlalchemy", "fastapi-async-sqlalchemy"),
    ):
        assert f"skipped {variant}: {distribution} is not installed" in result.stdout
        assert f"| {variant} |" not in result.stdout, result.stdout
    assert table_cell(result.stdout, "ours", 32, "variant") == "ours"


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
