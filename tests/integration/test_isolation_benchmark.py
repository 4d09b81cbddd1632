"""Smoke test of `python -m benchmarks.isolation`: it runs, reports, and cleans up.

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
