"""The service's test set-up after adoption: the plugin, and the server from settings."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from shop import settings
from shop.core.database.testing import share_session_with_app
from shop.main import app

pytest_plugins = ["shop.core.database.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def database_server_url() -> str:
    return settings.database_url()


@pytest.fixture
async def client(db_connection: AsyncConnection) -> AsyncIterator[httpx.AsyncClient]:
    """Each request gets a session of its own, joined to the test's transaction."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        yield client


@pytest.fixture
async def shared_client(db_session: AsyncSession) -> AsyncIterator[httpx.AsyncClient]:
    """Every request uses the test's own session (one identity map)."""
    share_session_with_app(app, db_session)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop") as client:
        yield client
