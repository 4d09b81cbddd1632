"""Settings of the reference service, read from the environment."""

from __future__ import annotations

import os

# The embedded default lets `make demo` run with nothing installed; production
# sets DATABASE_URL to a postgresql+asyncpg:// URL.
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./demo.sqlite3"


def database_url() -> str:
    """The URL the service and its migrations use: `DATABASE_URL`, else SQLite."""
    return os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
