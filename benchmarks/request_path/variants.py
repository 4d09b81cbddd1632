"""The five variants of the app shape, and the configurations a run measures.

A configuration is a variant on a driver (asyncpg or psycopg), connecting
directly to PostgreSQL or through PgBouncer in transaction mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from sqlalchemy.engine import URL

from .apps import ours_app, raw_app, seed_app
from .peers import advanced_alchemy_app, fastapi_async_sqlalchemy_app, missing

DRIVERS = ("asyncpg", "psycopg")
DEPLOYMENTS = ("direct", "pgbouncer")
POOLED = "pgbouncer"
"""The deployment behind a transaction pooler: each variant gets its pooler settings."""


@dataclass(frozen=True)
class Variant:
    """One implementation of the app shape; `make_app(url, pooled)` builds a fresh app."""

    name: str
    make_app: Callable[[URL, bool], FastAPI]
    # (module, distribution) of a peer library, which may be absent here.
    peer: tuple[str, str] | None = None
    # (driver, module, distribution): what the variant needs on that driver beyond
    # requirements.lock, which may be absent here.
    needs: tuple[tuple[str, str, str], ...] = ()

    def missing(self, driver: str | None = None) -> str | None:
        """Why this variant (on `driver`) cannot run here, or None."""
        if self.peer is not None:
            return missing(*self.peer)
        for needed_by, module, distribution in self.needs:
            if needed_by == driver:
                return missing(module, distribution)
        return None


VARIANTS = (
    Variant("raw", raw_app, needs=(("psycopg", "psycopg_pool", "psycopg-pool"),)),
    Variant("seed", seed_app),
    Variant("ours", ours_app),
    Variant("advanced_alchemy", advanced_alchemy_app, ("advanced_alchemy", "advanced-alchemy")),
    Variant(
        "fastapi_async_sqlalchemy",
        fastapi_async_sqlalchemy_app,
        ("fastapi_async_sqlalchemy", "fastapi-async-sqlalchemy"),
    ),
)
REFERENCE = "raw"
"""Every throughput is also shown as a ratio to this variant's, on the same driver and
deployment, at the same concurrency."""
OURS = "ours"


@dataclass(frozen=True)
class Configuration:
    """A variant on a driver, direct or through PgBouncer."""

    variant: Variant
    driver: str
    deployment: str

    @property
    def variant_name(self) -> str:
        return self.variant.name

    @property
    def pooled(self) -> bool:
        return self.deployment == POOLED

    @property
    def key(self) -> str:
        """A name without spaces or colons: the prefix of the rows its POSTs write."""
        return f"{self.variant.name}.{self.driver}.{self.deployment}"

    @property
    def label(self) -> str:
        return f"{self.variant.name} {self.driver} {self.deployment}"

    def make_app(self, url: URL) -> FastAPI:
        """A fresh app on this configuration's driver, connecting to `url`'s host and port
        (PostgreSQL for `direct`, PgBouncer or the counting proxy in front of it otherwise)."""
        return self.variant.make_app(url.set(drivername=f"postgresql+{self.driver}"), self.pooled)


def by_name(name: str) -> Variant:
    return next(variant for variant in VARIANTS if variant.name == name)
