"""Alembic migrations on real PostgreSQL, starting from an empty database of their own.

The suite's shared database is already migrated by the conftest, so it cannot show
that `upgrade head` works from nothing: these tests own a separate, empty one.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import app.models  # noqa: F401  (registers the models on Base.metadata)
from app.database import Base, DatabaseSessionManager
from tests.paths import REPO_ROOT
from tests.postgres import create_database, drop_database, url_under_test


def _alembic_config() -> Config:
    return Config(REPO_ROOT / "alembic.ini")


def _alembic_on(connection: Connection, run: Callable[[Config], None]) -> None:
    config = _alembic_config()
    # env.py migrates this connection instead of opening its own engine.
    config.attributes["connection"] = connection
    run(config)


def _upgrade_head(connection: Connection) -> None:
    _alembic_on(connection, lambda config: command.upgrade(config, "head"))


def _downgrade_base(connection: Connection) -> None:
    _alembic_on(connection, lambda config: command.downgrade(config, "base"))


def _table_names(connection: Connection) -> list[str]:
    return inspect(connection).get_table_names()


def _model_differences(connection: Connection) -> list[Any]:
    differences: list[Any] = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    return differences


async def _alembic_version_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        if "alembic_version" not in await connection.run_sync(_table_names):
            return 0
        return int(await connection.scalar(text("SELECT count(*) FROM alembic_version")) or 0)


@pytest.fixture(scope="module", name="empty_database_url")
async def empty_database_url_fixture() -> AsyncIterator[URL]:
    """A database of this module's own, empty when the module starts, dropped after it."""
    url = url_under_test()
    assert url.database, "TEST_DATABASE_URL must name a database"
    name = f"{url.database}_migrations"
    await create_database(url, name)
    yield url.set(database=name)
    await drop_database(url, name)


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
        assert await connection.run_sync(_table_names) == [], "a previous test left tables"
    yield module_engine
    async with module_engine.begin() as connection:
        await connection.run_sync(_downgrade_base)
        # Alembic keeps its version table, emptied, after a downgrade to base.
        await connection.execute(text("DROP TABLE IF EXISTS alembic_version"))


def test_script_directory_has_exactly_one_head() -> None:
    """Two heads would make `alembic upgrade head` refuse to run in production."""
    heads = ScriptDirectory.from_config(_alembic_config()).get_heads()

    assert len(heads) == 1, f"migration heads: {heads}"


async def test_upgrade_head_from_empty_creates_items_with_named_constraints(
    engine: AsyncEngine,
) -> None:
    """`upgrade head` on an empty database creates items with pk_items and uq_items_name."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade_head)

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
        await connection.run_sync(_upgrade_head)

    async with engine.connect() as connection:
        differences = await connection.run_sync(_model_differences)

    assert differences == []


async def test_downgrade_base_removes_the_items_table(engine: AsyncEngine) -> None:
    """`downgrade base` after `upgrade head` leaves no items table and no recorded revision."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade_head)

    async with engine.begin() as connection:
        await connection.run_sync(_downgrade_base)

    async with engine.connect() as connection:
        assert "items" not in await connection.run_sync(_table_names)
    assert await _alembic_version_rows(engine) == 0


async def _alembic_cli(url: URL, *args: str) -> tuple[int, str]:
    environment = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "alembic",
        *args,
        cwd=REPO_ROOT,
        env=environment,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def test_alembic_cli_upgrades_and_downgrades_with_its_own_engine(
    empty_database_url: URL, engine: AsyncEngine
) -> None:
    """The `alembic` command, reading DATABASE_URL, migrates up and back down again."""
    returncode, output = await _alembic_cli(empty_database_url, "upgrade", "head")
    assert returncode == 0, output
    async with engine.connect() as connection:
        assert "items" in await connection.run_sync(_table_names)

    returncode, output = await _alembic_cli(empty_database_url, "downgrade", "base")
    assert returncode == 0, output
    async with engine.connect() as connection:
        assert "items" not in await connection.run_sync(_table_names)
    assert await _alembic_version_rows(engine) == 0
