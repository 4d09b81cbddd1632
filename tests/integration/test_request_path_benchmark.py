"""Smoke tests of `python -m benchmarks.request_path` and of its round-trip proxy.

Tiny sizes, in the main venv, where the peer libraries and psycopg-pool are not
installed: they prove the benchmark runs every driver and deployment, reports and
cleans up, and count round trips that do not depend on timing; the figures come
from a full run (`make bench`). The `replica` deployment builds a private primary
and standby (3-5 s), so its test runs ours and ours_read alone, on the suite's driver.
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
from tests.drivers import DRIVER
from tests.paths import REPO_ROOT
from tests.postgres import asyncpg_dsn
from tests.subprocesses import Result, run_python

ROUND_TRIPS = "round trips GET / POST"
OPENED = "new connections per 1000"
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
    # GET through ReadSessionDep: the statement alone (its own read-only implicit
    # transaction); behind PgBouncer BEGIN READ ONLY and COMMIT around it. POST as ours.
    ("ours_read", "asyncpg", "direct"): "1 / 3",
    ("ours_read", "asyncpg", "pgbouncer"): "4 / 4",
    ("ours_read", "psycopg", "pgbouncer"): "3 / 3",
}
# ours_read's GET, direct, on either driver (psycopg's prepare on the 6th execution
# only adds a fraction): one round trip, issue 10's target.
READ_GET_ROUND_TRIPS = 1


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


def sequence(stdout: str, label: str, method: str = "GET") -> list[str]:
    """The round trips of one more GET (or POST) through configuration `label`, from the
    trace lines: `- <label>: GET `a` > `b`; POST `c`; at c=32: ...`."""
    found = re.search(rf"^- {re.escape(label)}: GET (.*?); POST (.*?); at c=", stdout, re.M)
    assert found, f"no trace for {label}:\n{stdout}"
    return re.findall(r"`([^`]*)`", found.group(1 if method == "GET" else 2))


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
    variants = ["seed", "ours", "ours_read"] + (["raw"] if PSYCOPG_POOL else [])
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
        if c == 1:  # the warm-up opened every connection the sequential calls use
            assert row[OPENED] == "0", f"{variant} {driver} {via}:\n{result.stdout}"
        assert re.fullmatch(r"\d+(\.\d+)? / \d+(\.\d+)?", row[ROUND_TRIPS]), result.stdout
        if (variant, driver, via) in EXPECTED_ROUND_TRIPS:
            assert _whole(row[ROUND_TRIPS]) == EXPECTED_ROUND_TRIPS[variant, driver, via], (
                f"{variant} {driver} {via} c={c}:\n{result.stdout}"
            )
    for driver in ("asyncpg", "psycopg"):
        get = rows["ours_read", driver, "direct", 1][ROUND_TRIPS].split(" / ")[0]
        assert math.floor(float(get)) == READ_GET_ROUND_TRIPS, result.stdout
        assert sequence(result.stdout, f"ours_read {driver} direct") == ["SELECT"]
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


async def test_reads_go_to_the_replica_in_one_round_trip(database_url: URL) -> None:
    """The replica deployment, GET-only: ours_read's GET runs on the standby in one round
    trip, a committed unit pays one more (the primary's WAL position) with a replica
    configured, the routing and the read targets are reported, and both private
    clusters are gone at the end."""
    result = await run_benchmark(
        database_url,
        *TINY,
        *("--only", "ours", "ours_read"),
        *("--drivers", DRIVER, "--deployments", "replica", "--get-only"),
    )

    assert result.returncode == 0, result.output
    if "skipped deployment replica:" in result.stdout:
        pytest.skip(result.stdout.split("skipped deployment replica:")[1].splitlines()[0])
    rows = timing_rows(result.stdout)
    get = rows["ours_read", DRIVER, "replica", 1][ROUND_TRIPS].split(" / ")[0]
    assert math.floor(float(get)) == READ_GET_ROUND_TRIPS, result.stdout
    assert sequence(result.stdout, f"ours_read {DRIVER} replica") == ["replica:SELECT"]
    # A committed unit (AsyncSessionDep's GET too) then reads the primary's WAL position.
    assert sequence(result.stdout, f"ours {DRIVER} replica")[-1] == "WAL position"
    assert sequence(result.stdout, f"ours_read {DRIVER} replica", "POST")[-1] == "WAL position"
    assert "load: GET /rows/{id} only" in result.stdout
    assert "| ReadSessionDep on the replica / AsyncSessionDep with the replica" in result.stdout
    # Reported, not asserted met: one round trip more in 5 counted GETs (psycopg's prepare
    # on a statement's 6th execution, a failed probe's sample) is over the 0.05 allowed.
    assert f"- ours_read {DRIVER} replica, 1 round trip per GET: " in result.stdout

    ports = re.search(r"primary 127\.0\.0\.1:(\d+), standby 127\.0\.0\.1:(\d+)", result.stderr)
    assert ports, result.stderr
    for port in ports.groups():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=2).close()


def table_rows(stdout: str, title: str) -> list[list[str]]:
    """The rows of the table after the line starting with `title`, as lists of cells."""
    lines = stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(title)), None)
    assert start is not None, f"no {title!r}:\n{stdout}"
    rows = []
    for line in lines[start + 4 :]:  # the title, a blank line, the header and its rule
        if not line.startswith("|"):
            break
        rows.append(cells(line))
    return rows


async def test_instrumentation_on_and_off_side_by_side(database_url: URL) -> None:
    """ours_otel (ours with enable_telemetry() on, only while it runs) next to ours: the
    same round trips (the commenter is off), and their ratio per concurrency."""
    result = await run_benchmark(
        database_url,
        *TINY,
        *("--only", "ours", "ours_otel", "--drivers", DRIVER, "--deployments", "direct"),
    )

    assert result.returncode == 0, result.output
    rows = timing_rows(result.stdout)
    # An average over few requests: psycopg's prepare at a statement's 5th use, or a
    # connection opened under load, adds a fraction; a whole extra round trip fails.
    for c in (1, 32):
        post = rows["ours_otel", DRIVER, "direct", c][ROUND_TRIPS].split(" / ")[1]
        assert round(float(post)) == 3, post
    assert sequence(result.stdout, f"ours_otel {DRIVER} direct") == sequence(
        result.stdout, f"ours {DRIVER} direct"
    )
    found = table_rows(result.stdout, "Instrumentation: ours with enable_telemetry() on")
    assert [row[:4] for row in found] == [["direct", DRIVER, str(c), "-"] for c in (1, 32)]
    for row in found:
        assert re.fullmatch(r"\d+\.\d\dx \(\d+\.\d\d-\d+\.\d\d\)", row[4]), result.stdout
    assert "opentelemetry-sdk 1." in result.stdout  # its version, in the header


async def test_http_runs_each_configuration_on_both_uvicorn_stacks(database_url: URL) -> None:
    """`--http`: every configuration under uvicorn with asyncio+h11 and with
    uvloop+httptools (set, not left to `auto`), labelled, and their ratio; ours_otel
    serves under uvicorn too."""
    result = await run_benchmark(
        database_url,
        *TINY,
        *("--only", "ours_otel", "--drivers", DRIVER, "--deployments", "direct", "--http"),
    )

    assert result.returncode == 0, result.output
    served = table_rows(result.stdout, "Real HTTP (uvicorn per configuration and stack")
    assert [row[:5] for row in served] == [
        ["direct", DRIVER, str(c), "ours_otel", stack]
        for c in (1, 32)
        for stack in ("asyncio+h11", "uvloop+httptools")
    ], result.stdout
    stacks = table_rows(result.stdout, "uvicorn's stacks, round by round:")
    assert [row[:4] for row in stacks] == [["direct", DRIVER, str(c), "ours_otel"] for c in (1, 32)]
    assert "loop=asyncio http=h11 and loop=uvloop http=httptools" in result.stdout
    assert re.search(r"uvloop \d", result.stdout), result.stdout  # both versions, in the header
    assert re.search(r"httptools \d", result.stdout), result.stdout


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
