"""Settings of the reference service, read from the environment."""

from __future__ import annotations

import logging
import os

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
