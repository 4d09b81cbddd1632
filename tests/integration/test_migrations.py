"""Alembic migrations on real PostgreSQL, starting from an empty database of their own.

The suite's shared database is already migrated by the conftest, so it cannot show
that `upgrade head` works from nothing: these tests own a separate, empty one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import app.models  # noqa: F401  (registers the models on Base.metadata)
from app.database import Base, DatabaseSessionManager
from app.database.testing import create_test_database, drop_test_database
from tests.migrations import alembic_config, downgrade, run_alembic, table_names, upgrade


def _model_differences(connection: Connection) -> list[Any]:
    differences: list[Any] = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    return differences


async def _alembic_version_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        if "alembic_version" not in await connection.run_sync(table_names):
            return 0
        return int(await connection.scalar(text("SELECT count(*) FROM alembic_version")) or 0)


@pytest.fixture(scope="module", name="empty_database_url")
async def empty_database_url_fixture(database_url: URL) -> AsyncIterator[URL]:
    """A database of this module's own, empty when the module starts, dropped after it."""
    own = database_url.set(database=f"{database_url.database}_migrations")
    await create_test_database(own)
    yield own
    await drop_test_database(own)


@pytest.fixture(scope="module", name="module_engine")
async def module_engine_fixture(empty_database_url: URL) -> AsyncIterator[AsyncEngine]:
    """An engine on the empty database, from a private manager: the app's is the conftest's."""
    manager = DatabaseSessionManager()
    manager.init(url=empty_database_url)
    try:
        yield manager.engine
    finally:
        await manager.close()


@pytest.fixture(name="engine")
async def engine_fixture(module_engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    """The module's engine, on a schema that is empty before the test and after it."""
    async with module_engine.connect() as connection:
        assert await connection.run_sync(table_names) == [], "a previous test left tables"
    yield module_engine
    async with module_engine.begin() as connection:
        await connection.run_sync(downgrade)
        # Alembic keeps its version table, emptied, after a downgrade to base.
        await connection.execute(text("DROP TABLE IF EXISTS alembic_version"))


def test_script_directory_has_exactly_one_head() -> None:
    """Two heads would make `alembic upgrade head` refuse to run in production."""
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()

    assert len(heads) == 1, f"migration heads: {heads}"


async def test_upgrade_head_from_empty_creates_items_with_named_constraints(
    engine: AsyncEngine,
) -> None:
    """`upgrade head` on an empty database creates items with pk_items and uq_items_name."""
    async with engine.begin() as connection:
        await connection.run_sync(upgrade)

    async with engine.connect() as connection:
        constraints = await connection.execute(
            text(
                "SELECT conname, contype::text FROM pg_constraint"
                " WHERE conrelid = 'items'::regclass AND contype IN ('p', 'u')"
                " ORDER BY conname"
            )
        )
        assert [tuple(row) for row in constraints] == [("pk_items", "p"), ("uq_items_name", "u")]
    assert await _alembic_version_rows(engine) == 1


async def test_models_match_the_migrations(engine: AsyncEngine) -> None:
    """After `upgrade head`, autogenerate finds nothing: no model change lacks a migration."""
    async with engine.begin() as connection:
        await connection.run_sync(upgrade)

    async with engine.connect() as connection:
        differences = await connection.run_sync(_model_differences)

    assert differences == []


async def test_downgrade_base_removes_the_items_table(engine: AsyncEngine) -> None:
    """`downgrade base` after `upgrade head` leaves no items table and no recorded revision."""
    async with engine.begin() as connection:
        await connection.run_sync(upgrade)

    async with engine.begin() as connection:
        await connection.run_sync(downgrade)

    async with engine.connect() as connection:
        assert "items" not in await connection.run_sync(table_names)
    assert await _alembic_version_rows(engine) == 0


async def test_alembic_cli_upgrades_and_downgrades_with_its_own_engine(
    empty_database_url: URL, engine: AsyncEngine
) -> None:
    """The `alembic` command, reading DATABASE_URL, migrates up and back down again."""
    upgraded = await run_alembic("upgrade", "head", database_url=empty_database_url)
    assert upgraded.returncode == 0, upgraded.output
    async with engine.connect() as connection:
        assert "items" in await connection.run_sync(table_names)

    downgraded = await run_alembic("downgrade", "base", database_url=empty_database_url)
    assert downgraded.returncode == 0, downgraded.output
    async with engine.connect() as connection:
        assert "items" not in await connection.run_sync(table_names)
    assert await _alembic_version_rows(engine) == 0
