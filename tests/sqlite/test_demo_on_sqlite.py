"""The embedded SQLite default, which `make demo` runs on with nothing installed.

These tests use no PostgreSQL fixtures: each gets its own SQLite file. The
reference app's lifespan opens the module-level `session_manager`, which the
integration suite keeps open on PostgreSQL in the same process, so every module
that looks it up at request time is pointed at a private manager for the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

import app.database._fastapi
import app.health
import app.main
from app.config import DEFAULT_DATABASE_URL, database_url
from app.database import (
    DatabaseConfigError,
    DatabaseSessionManager,
    ReadOnlyTransactionError,
    session_manager,
)
from tests.item_routes import *  # noqa: F403  (pytest collects the imported tests)
from tests.migrations import alembic_config, run_alembic, table_names, upgrade


@pytest.fixture(name="sqlite_url")
def sqlite_url_fixture(tmp_path: Path) -> str:
    """A URL for an SQLite file that does not exist yet, private to the test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'demo.sqlite3'}"


@pytest.fixture(name="client")
async def client_fixture(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the reference app, running its real lifespan on a migrated SQLite file."""
    migrator = DatabaseSessionManager()
    migrator.init(url=sqlite_url)
    try:
        async with migrator.engine.begin() as connection:
            await connection.run_sync(upgrade)
    finally:
        await migrator.close()

    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    manager = DatabaseSessionManager()
    # Every module that reads `session_manager` when a request or the lifespan runs.
    for module in (app.main, app.health, app.database._fastapi):
        monkeypatch.setattr(module, "session_manager", manager)
    global_state = repr(session_manager)

    application = app.main.create_app()
    async with application.router.lifespan_context(application):
        assert "open" in repr(manager), "the lifespan did not open the session manager"
        assert manager.engine.dialect.name == "sqlite"
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client

    assert "closed" in repr(manager), "the lifespan did not close the session manager"
    assert repr(session_manager) == global_state, "the test touched the global manager"


async def test_alembic_cli_upgrades_an_sqlite_file(sqlite_url: str) -> None:
    """`alembic upgrade head` with DATABASE_URL on SQLite creates items and records head."""
    upgraded = await run_alembic("upgrade", "head", database_url=sqlite_url)
    assert upgraded.returncode == 0, upgraded.output

    manager = DatabaseSessionManager()
    manager.init(url=sqlite_url)
    try:
        async with manager.engine.connect() as connection:
            assert "items" in await connection.run_sync(table_names)
            version = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    finally:
        await manager.close()
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()


async def test_health_is_ok_on_sqlite(client: httpx.AsyncClient) -> None:
    """GET /health makes a real round trip to the SQLite file and answers 200."""
    response = await client.get("/health")

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "ok"


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_database_url_defaults_to_sqlite(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    """Without a usable DATABASE_URL the service runs on the embedded SQLite file."""
    if value is None:
        monkeypatch.delenv("DATABASE_URL", raising=False)
    else:
        monkeypatch.setenv("DATABASE_URL", value)

    assert database_url() == DEFAULT_DATABASE_URL
    assert DEFAULT_DATABASE_URL.startswith("sqlite+aiosqlite:///")


async def test_isolation_levels_are_refused_on_sqlite(sqlite_url: str) -> None:
    """PostgreSQL's levels mean something else on SQLite: refused before connecting."""
    manager = DatabaseSessionManager()
    manager.init(url=sqlite_url)
    try:
        with pytest.raises(DatabaseConfigError, match="for PostgreSQL engines"):
            async with manager.session(isolation_level="SERIALIZABLE"):
                pass
    finally:
        await manager.close()


async def test_a_read_only_unit_on_sqlite_refuses_writes_and_the_next_unit_writes(
    sqlite_url: str,
) -> None:
    """PRAGMA query_only enforces read_only=True on SQLite, for that unit only."""
    manager = DatabaseSessionManager()
    manager.init(url=sqlite_url, pool_size=1, max_overflow=0)
    try:
        async with manager.session() as session:
            await session.execute(text("CREATE TABLE notes (body text)"))
        with pytest.raises(ReadOnlyTransactionError):
            async with manager.session(read_only=True) as session:
                await session.execute(text("INSERT INTO notes VALUES ('refused')"))
        async with manager.session(read_only=True) as session:
            assert await session.scalar(text("SELECT count(*) FROM notes")) == 0
        async with manager.session() as session:  # the same, only, connection
            await session.execute(text("INSERT INTO notes VALUES ('written')"))
        async with manager.session(read_only=True) as session:
            assert await session.scalar(text("SELECT count(*) FROM notes")) == 1
    finally:
        await manager.close()
