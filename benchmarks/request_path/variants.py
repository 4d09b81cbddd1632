"""The five variants of the app shape, in the report's row order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI
from sqlalchemy.engine import URL

from .apps import ours_app, raw_app, seed_app
from .peers import advanced_alchemy_app, fastapi_async_sqlalchemy_app, missing


@dataclass(frozen=True)
class Variant:
    """One implementation of the app shape; `make_app(url)` builds a fresh app."""

    name: str
    make_app: Callable[[URL], FastAPI]
    # (module, distribution) of a peer library, which may be absent here.
    peer: tuple[str, str] | None = None

    def missing(self) -> str | None:
        """Why this variant cannot run here, or None."""
        return None if self.peer is None else missing(*self.peer)


VARIANTS = (
    Variant("raw", raw_app),
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
"""Every throughput is also shown as a ratio to this variant's, at the same concurrency."""
