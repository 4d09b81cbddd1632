"""The service's settings."""

from __future__ import annotations

import os

DEFAULT_DATABASE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/shop"


def database_url() -> str:
    """Where the service's database is: SHOP_DATABASE_URL, else the developer's."""
    return os.environ.get("SHOP_DATABASE_URL", DEFAULT_DATABASE_URL)
