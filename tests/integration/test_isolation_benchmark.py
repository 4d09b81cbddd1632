"""Smoke test of `python -m benchmarks.isolation`: it runs, reports, cleans up, and
without a server it says which setting to fix.

Tiny sizes, so it proves the benchmark works, not what it measures; the figures
come from a full run (`make bench-isolation`).
"""

from __future__ import annotations

import os
import re

import asyncpg
from sqlalchemy.engine import URL

from benchmarks.isolation.strategies import STRATEGIES
from tests.paths import REPO_ROOT
from tests.subprocesses import run_python


async def test_benchmark_reports_every_strategy_and_drops_its_databases(
    database_url: URL, observer: asyncpg.Connection
) -> None:
    """A tiny run prints a row per strategy and leaves no database of its own behind."""
    # Our pid in the base name: the run appends its own, so every database it makes
    # starts with `prefix`, and a benchmark running beside the suite is not counted.
    prefix = f"bench_isolation_smoke_{os.getpid()}"
    url = database_url.set(database=prefix)
    env = {**os.environ, "BENCH_DATABASE_URL": url.render_as_string(hide_password=False)}

    result = await run_python(
        *("-m", "benchmarks.isolation", "--rounds", "1", "--tests", "2"),
        *("--template-tests", "1", "--seed", "1"),
        cwd=REPO_ROOT,
        env=env,
    )

    assert result.returncode == 0, result.output
    for strategy in STRATEGIES:
        assert re.search(rf"^\| {strategy.name} \| \d+ \|", result.stdout, re.M), result.stdout
    assert "isolation overhead (rollback minus bare)" in result.stdout, result.stdout
    left = await observer.fetch(
        "SELECT datname FROM pg_database WHERE starts_with(datname, $1)", prefix
    )
    assert [row["datname"] for row in left] == []


async def test_benchmark_without_a_server_names_the_setting_to_fix() -> None:
    """With no server at BENCH_DATABASE_URL it exits 2 with a short message, no traceback."""
    # Port 1: nothing listens there, so the very first CREATE DATABASE cannot connect.
    url = "postgresql+asyncpg://postgres@127.0.0.1:1/bench_isolation"
    env = {**os.environ, "BENCH_DATABASE_URL": url}

    result = await run_python(
        *("-m", "benchmarks.isolation", "--rounds", "1", "--tests", "1"),
        cwd=REPO_ROOT,
        env=env,
    )

    assert result.returncode == 2, result.output
    assert "no PostgreSQL server answers" in result.stderr, result.output
    assert "BENCH_DATABASE_URL" in result.stderr, result.output
    assert "Traceback" not in result.output, result.output
