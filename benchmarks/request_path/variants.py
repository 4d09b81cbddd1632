"""The variants of the app shape, and the configurations a run measures.

A configuration is a variant on a driver (asyncpg or psycopg), connecting
directly to PostgreSQL, through PgBouncer in transaction mode, or to a private
primary with a streaming replica that this package's layers read from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from sqlalchemy.engine import URL

from .apps import ours_app, ours_read_app, raw_app, seed_app
from .otel import HINT as OTEL_HINT
from .otel import NEEDS as OTEL_NEEDS
from .otel import ours_otel_app
from .peers import BENCH_HINT, advanced_alchemy_app, fastapi_async_sqlalchemy_app, missing

DRIVERS = ("asyncpg", "psycopg")
DEPLOYMENTS = ("direct", "pgbouncer", "replica")
POOLED = "pgbouncer"
"""The deployment behind a transaction pooler: each variant gets its pooler settings."""
REPLICATED = "replica"
"""The deployment on a private primary with a hot standby: this package's variants are
given the standby in `replica_urls`; the other layers, which have no notion of replicas,
use the primary alone."""

AppFactory = Callable[[URL, bool, tuple[URL, ...]], FastAPI]
"""`(url, pooled, replica_urls)`: a fresh app connecting to `url`, behind a transaction
pooler if `pooled`, which may read from `replica_urls` (empty but in `replica`)."""


def primary_only(factory: Callable[[URL, bool], FastAPI]) -> AppFactory:
    """A layer with no notion of replicas: every request goes to `url`, the primary."""

    def make_app(url: URL, pooled: bool, replica_urls: tuple[URL, ...]) -> FastAPI:
        return factory(url, pooled)

    return make_app


@dataclass(frozen=True)
class Servers:
    """Where a configuration's app connects: PostgreSQL (or PgBouncer, or the counting
    proxy in front of either), and the replicas its reads may use."""

    url: URL
    replica_urls: tuple[URL, ...] = ()


@dataclass(frozen=True)
class Variant:
    """One implementation of the app shape; `make_app` builds a fresh app."""

    name: str
    make_app: AppFactory
    # (module, distribution) of a peer library, which may be absent here.
    peer: tuple[str, str] | None = None
    # (driver, module, distribution): what the variant needs on that driver beyond
    # requirements.lock, which may be absent here.
    needs: tuple[tuple[str, str, str], ...] = ()
    # Where the `needs` come from, when not from requirements-bench.txt.
    hint: str = BENCH_HINT

    def missing(self, driver: str | None = None) -> str | None:
        """Why this variant (on `driver`) cannot run here, or None."""
        if self.peer is not None:
            return missing(*self.peer)
        for needed_by, module, distribution in self.needs:
            if needed_by == driver and (reason := missing(module, distribution, self.hint)):
                return reason
        return None


VARIANTS = (
    Variant("raw", primary_only(raw_app), needs=(("psycopg", "psycopg_pool", "psycopg-pool"),)),
    Variant("seed", primary_only(seed_app)),
    Variant("ours", ours_app),
    Variant("ours_read", ours_read_app),
    Variant(
        "ours_otel",
        ours_otel_app,
        needs=tuple((driver, *needed) for driver in DRIVERS for needed in OTEL_NEEDS),
        hint=OTEL_HINT,
    ),
    Variant(
        "advanced_alchemy",
        primary_only(advanced_alchemy_app),
        ("advanced_alchemy", "advanced-alchemy"),
    ),
    Variant(
        "fastapi_async_sqlalchemy",
        primary_only(fastapi_async_sqlalchemy_app),
        ("fastapi_async_sqlalchemy", "fastapi-async-sqlalchemy"),
    ),
)
REFERENCE = "raw"
"""Every throughput is also shown as a ratio to this variant's, on the same driver and
deployment, at the same concurrency."""
OURS = "ours"
OURS_READ = "ours_read"
"""Ours with its GET through ReadSessionDep (`session(read_only=True)`); POST as ours."""
OURS_OTEL = "ours_otel"
"""Ours with `enable_telemetry()` on, into SDK providers that keep nothing."""


SERVER_STACKS = {"asyncio+h11": ("asyncio", "h11"), "uvloop+httptools": ("uvloop", "httptools")}
"""The `--http` pass's uvicorn stacks, by label: (`loop`, `http`). The first is plain
uvicorn's pure-Python pair; the second what `uvicorn[standard]` installs, which
uvicorn's `auto` picks whenever uvloop and httptools import."""


@dataclass(frozen=True)
class Configuration:
    """A variant on a driver, direct or through PgBouncer; under uvicorn with the
    `server` stack of SERVER_STACKS in the `--http` pass ("" in-process)."""

    variant: Variant
    driver: str
    deployment: str
    server: str = ""

    @property
    def variant_name(self) -> str:
        return self.variant.name

    @property
    def pooled(self) -> bool:
        return self.deployment == POOLED

    @property
    def key(self) -> str:
        """A name without spaces or colons: the prefix of the rows its POSTs write."""
        key = f"{self.variant.name}.{self.driver}.{self.deployment}"
        return f"{key}.{self.server}" if self.server else key

    @property
    def label(self) -> str:
        label = f"{self.variant.name} {self.driver} {self.deployment}"
        return f"{label} {self.server}" if self.server else label

    @property
    def replicated(self) -> bool:
        return self.deployment == REPLICATED

    def make_app(self, servers: Servers) -> FastAPI:
        """A fresh app on this configuration's driver, connecting to `servers`' hosts and
        ports (PostgreSQL for `direct`, PgBouncer or the counting proxy in front of it
        otherwise)."""
        drivername = f"postgresql+{self.driver}"
        replica_urls = tuple(url.set(drivername=drivername) for url in servers.replica_urls)
        return self.variant.make_app(
            servers.url.set(drivername=drivername), self.pooled, replica_urls
        )


def by_name(name: str) -> Variant:
    return next(variant for variant in VARIANTS if variant.name == name)
