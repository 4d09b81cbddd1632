"""What a run prints before measuring: its command, seed, versions and the package's commit.

`ours` measures whatever app/database holds, committed or not, so the header says which.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
from collections.abc import Sequence
from importlib import metadata

from . import pgbouncer
from .load import GET_SHARE
from .timing import CONCURRENCIES, batch_size
from .variants import SERVER_STACKS, Configuration

DISTRIBUTIONS = (
    *("fastapi", "starlette", "pydantic", "sqlalchemy", "asyncpg", "psycopg", "psycopg-binary"),
    *("psycopg-pool", "uvicorn", "uvloop", "httptools", "httpx"),
    *("advanced-alchemy", "fastapi-async-sqlalchemy"),
    # ours_otel's; the --http pass's stacks are uvicorn's asyncio+h11 and uvloop+httptools.
    *("opentelemetry-sdk", "opentelemetry-instrumentation-sqlalchemy"),
)


def package_revision() -> str:
    """The commit `ours` was measured at, and whether app/database differs from it."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head, changes = (
            subprocess.run(
                command, cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
            for command in (
                ["git", "rev-parse", "--short", "HEAD"],
                ["git", "status", "--porcelain", "--", "app/database"],
            )
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout)"
    return f"{head}, " + ("with uncommitted changes in app/database" if changes else "clean")


def _version(distribution: str) -> str:
    try:
        return f"{distribution} {metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return f"{distribution} (not installed)"


def header(
    argv: Sequence[str],
    options: argparse.Namespace,
    configurations: Sequence[Configuration],
    skipped: list[str],
) -> list[str]:
    low = batch_size(options.requests, 1)
    versions = [f"Python {platform.python_version()}"]
    versions += [_version(name) for name in DISTRIBUTIONS]
    if any(conf.pooled for conf in configurations):
        versions.append(pgbouncer.version())
    mix = (
        "GET /rows/{id} only"
        if options.get_only
        else f"{GET_SHARE:.0%} GET /rows/{{id}} and {1 - GET_SHARE:.0%} POST /rows, mixed"
    )
    lines = [
        f"command: {shlex.join(['python', '-m', 'benchmarks.request_path', *argv])}",
        f"seed: {options.seed} (pass --seed {options.seed} to repeat this order and load)",
        f"versions: {', '.join(versions)}",
        f"app.database at: {package_revision()}",
        f"configurations: {len(configurations)} (drivers {','.join(options.drivers)}; "
        f"deployments {','.join(options.deployments)})",
        f"load: {mix}; {options.rounds} rounds, each opening every configuration in a "
        f"shuffled order for a warm-up of {options.warm_up} requests, then one batch per "
        f"concurrency ({options.requests} requests at c={max(CONCURRENCIES)}, {low} at c=1); "
        "apps called in-process through ASGI"
        + (
            "; then over HTTP, each configuration under uvicorn twice: "
            + " and ".join(f"loop={loop} http={http}" for loop, http in SERVER_STACKS.values())
            if options.http
            else ""
        ),
    ]
    return lines + [f"skipped {note}" for note in skipped]
