"""Integration fixtures on real PostgreSQL.

The package's pytest plugin (enabled in tests/conftest.py) gives `database`,
`db_connection`, `db_session` and `count_queries`: most tests run inside an
outer transaction that is rolled back after them. Tests that must prove a real
COMMIT use `committed_db`, which truncates what they wrote.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import DatabaseSessionManager
from app.database.testing import share_session_with_app
from app.main import create_app
from tests.postgres import asyncpg_dsn, checked_out


@pytest.fixture(name="client")
async def client_fixture(db_session: AsyncSession) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the reference app whose requests all use `db_session`."""
    app = create_app()
    share_session_with_app(app, db_session)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@pytest.fixture(name="committed_db")
async def committed_db_fixture(
    database: DatabaseSessionManager,
) -> AsyncIterator[DatabaseSessionManager]:
    """The real `session_manager` for tests that commit; their rows are removed after."""
    yield database
    try:
        assert checked_out(database) == 0, "a test left a connection checked out"
    finally:
        # Even after a leak, so no committed row reaches later tests.
        async with database.engine.begin() as connection:
            # A leaked connection may still hold a lock on items: fail, rather than hang.
            await connection.execute(text("SET LOCAL lock_timeout = '10s'"))
            await connection.execute(text("TRUNCATE items RESTART IDENTITY CASCADE"))


@pytest.fixture(name="observer")
async def observer_fixture(database_url: URL) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection, outside SQLAlchemy's pool, to see what was committed."""
    connection = await asyncpg.connect(asyncpg_dsn(database_url))
    yield connection
    await connection.close()
