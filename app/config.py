"""Settings of the reference service, read from the environment."""

from __future__ import annotations

import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

# The embedded default lets `make demo` run with nothing installed; production
# sets DATABASE_URL to a postgresql+asyncpg:// URL.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./demo.sqlite3"


def database_url() -> str:
    """The URL the service and its migrations use: `DATABASE_URL`, else SQLite."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        # Loud, so a production deployment that lost its setting is noticed.
        logger.warning(
            "DATABASE_URL is not set: using the embedded demo database %s", DEFAULT_DATABASE_URL
        )
        return DEFAULT_DATABASE_URL
    return url


def database_options() -> dict[str, Any]:
    """`init()` options from the environment, beside the URL.

    `DATABASE_TRANSACTION_POOLER=1` when the URL points at a transaction-mode pooler
    (PgBouncer, RDS Proxy, ...); `DATABASE_POOL_SIZE=N` for a fixed pool of N;
    `DATABASE_REPLICA_URLS=url1,url2` for streaming replicas that serve the GETs.
    """
    options: dict[str, Any] = {}
    pooler = os.environ.get("DATABASE_TRANSACTION_POOLER", "").strip().lower()
    if pooler not in ("", "0", "1", "false", "true"):
        raise ValueError(f"DATABASE_TRANSACTION_POOLER must be 0 or 1, got {pooler!r}")
    if pooler in ("1", "true"):
        options["transaction_pooler"] = True
    replicas = os.environ.get("DATABASE_REPLICA_URLS", "").strip()
    if replicas:
        options["replica_urls"] = [url.strip() for url in replicas.split(",") if url.strip()]
    pool_size = os.environ.get("DATABASE_POOL_SIZE", "").strip()
    if pool_size:
        if not pool_size.isdigit() or int(pool_size) < 1:
            raise ValueError(f"DATABASE_POOL_SIZE must be a positive integer, got {pool_size!r}")
        # The package's pool has no overflow by default, so this is the whole pool.
        options["pool_size"] = int(pool_size)
    return options


def telemetry_enabled() -> bool:
    """`DATABASE_TELEMETRY=1`: traces and metrics on OpenTelemetry (the `otel` extra)."""
    value = os.environ.get("DATABASE_TELEMETRY", "").strip().lower()
    if value not in ("", "0", "1", "false", "true"):
        raise ValueError(f"DATABASE_TELEMETRY must be 0 or 1, got {value!r}")
    return value in ("1", "true")


def slow_unit_seconds() -> float | None:
    """`DATABASE_SLOW_UNIT_SECONDS=s`: log each unit of work that takes s seconds or more."""
    value = os.environ.get("DATABASE_SLOW_UNIT_SECONDS", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also NaN
        raise ValueError(f"DATABASE_SLOW_UNIT_SECONDS must be seconds >= 0, got {value!r}")
    return seconds
