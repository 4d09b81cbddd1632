"""`GET /health/migrations`: the database's Alembic revision against the code's head."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection

from app import health
from app.database import DatabaseSessionManager
from app.health import MigrationStatus, migration_status
from app.main import create_app
from tests.round_trips import counted_manager

HEAD = ["0001"]


@pytest.fixture(name="client")
async def client_fixture() -> AsyncIterator[httpx.AsyncClient]:
    """The reference app without its lifespan: the test plugin's manager is open."""
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_at_the_head_revision_the_check_answers_200(
    database: DatabaseSessionManager, client: httpx.AsyncClient
) -> None:
    response = await client.get("/health/migrations")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": HEAD, "code": HEAD}


async def test_a_database_never_migrated_or_migrated_by_newer_code_is_reported(
    db_connection: AsyncConnection,
) -> None:
    """No revision recorded: behind. A revision the code lacks: unknown revision."""
    await db_connection.execute(text("DELETE FROM alembic_version"))
    assert await db_connection.run_sync(migration_status) == MigrationStatus(
        status="behind", database=[], code=HEAD
    )
    await db_connection.execute(text("INSERT INTO alembic_version VALUES ('ffffffffffff')"))
    assert await db_connection.run_sync(migration_status) == MigrationStatus(
        status="unknown revision", database=["ffffffffffff"], code=HEAD
    )


async def test_a_deploy_that_did_not_migrate_answers_503(
    committed_db: DatabaseSessionManager, client: httpx.AsyncClient, observer: asyncpg.Connection
) -> None:
    """The service's own connection sees the database behind: 503, with both revisions."""
    await observer.execute("DELETE FROM alembic_version")
    try:
        response = await client.get("/health/migrations")
    finally:
        await observer.execute("INSERT INTO alembic_version VALUES ($1)", HEAD[0])

    assert response.status_code == 503
    assert response.json() == {"status": "behind", "database": [], "code": HEAD}


async def test_an_unreachable_database_answers_503_naming_only_the_error_class(
    database: DatabaseSessionManager, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "session_manager", DatabaseSessionManager())

    response = await client.get("/health/migrations")

    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "DatabaseNotInitializedError"}


async def test_the_check_costs_one_round_trip_more_than_health(
    database: DatabaseSessionManager,
    database_url: URL,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its cost, pinned: the version table's existence and its rows; /health is unchanged."""
    async with counted_manager(database_url, monkeypatch) as (manager, proxy):
        monkeypatch.setattr(health, "session_manager", manager)
        for warm_up in ("/health/migrations", "/health"):  # connected, statements prepared
            assert (await client.get(warm_up)).status_code == 200
        proxy.reset(record=True)
        assert (await client.get("/health/migrations")).status_code == 200
        migrations = proxy.round_trips, proxy.trace
        proxy.reset(record=True)
        assert (await client.get("/health")).status_code == 200
        plain = proxy.round_trips, proxy.trace

    assert migrations[0] == plain[0] + 1, (migrations, plain)
