"""Alembic migrations on real PostgreSQL, starting from an empty database of their own.

The suite's shared database is already migrated by the conftest, so it cannot show
that `upgrade head` works from nothing: these tests own a separate, empty one.

pytest-alembic's tests are imported below and run on it, handed an AsyncEngine of
the driver under test. Its plugin stays disabled (`-p no:pytest_alembic` in
pyproject.toml: on pytest 9 it breaks collection), so this module gives the
fixtures those tests need. The hand-written tests left are the ones checking what
pytest-alembic does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
from alembic.config import Config
from pytest_alembic import MigrationContext, runner
from pytest_alembic.config import Config as PytestAlembicConfig
from pytest_alembic.tests import (  # noqa: F401  (pytest collects the imported tests)
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)
from pytest_alembic.tests.experimental import (  # noqa: F401  (collected, as above)
    test_downgrade_leaves_no_trace,
)
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

import app.models  # noqa: F401  (registers the models on Model.metadata)
from app.database import DatabaseSessionManager
from app.database.testing import create_test_database, drop_test_database
from tests.migrations import alembic_config, downgrade, run_alembic, table_names, upgrade

# Not imported: the experimental test_all_models_register_on_metadata. It finds the
# models' package through a `DeclarativeMeta` base or a `MetaData` in a package's
# namespace; Base is a 2.0-style DeclarativeBase and the models live in a module
# (app.models), so it fails to find any ("Unable to locate a MetaData reference"),
# with or without its model_package argument. env.py imports app.models itself.


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


@pytest.fixture(name="alembic_config")
def alembic_config_fixture() -> Config:
    """The repository's alembic.ini, found whatever the working directory."""
    return alembic_config()


@pytest.fixture(name="alembic_engine")
async def alembic_engine_fixture(
    engine: AsyncEngine, empty_database_url: URL
) -> AsyncIterator[AsyncEngine]:
    """An AsyncEngine of the package, as a user of both would hand it to pytest-alembic.

    Its own, not `engine`: pytest-alembic uses it from sync code, where env.py runs
    a loop of its own per command, and an idle connection of this loop in its pool
    would be unusable there. `engine` (a dependency) empties the schema afterwards.
    """
    manager = DatabaseSessionManager()
    manager.init(url=empty_database_url)
    try:
        yield manager.engine
    finally:
        await manager.close()


@pytest.fixture(name="alembic_runner")
def alembic_runner_fixture(
    alembic_config: Config, alembic_engine: AsyncEngine
) -> Iterator[MigrationContext]:
    """What pytest-alembic's tests drive: as its plugin's own fixture, on our config and engine."""
    config = PytestAlembicConfig.from_raw_config(alembic_config)
    # Typed for sync engines only, but it takes an AsyncEngine (its executor checks).
    with runner(config, alembic_engine) as context:  # type: ignore[arg-type]
        yield context


async def _given_connection(engine: AsyncEngine, _: URL) -> None:
    async with engine.connect() as connection:
        transaction = await connection.begin()
        await connection.run_sync(upgrade)
        assert transaction.is_active, "env.py ended the caller's transaction"
        await transaction.rollback()


async def _given_async_connection(engine: AsyncEngine, _: URL) -> None:
    async with engine.connect() as connection:
        transaction = await connection.begin()
        # Inside run_sync: Alembic is synchronous, so only there can it use an
        # AsyncConnection of the running loop.
        await connection.run_sync(lambda _: upgrade(connection))
        assert transaction.is_active, "env.py ended the caller's transaction"
        await transaction.rollback()


async def _given_engine(_: AsyncEngine, url: URL) -> None:
    # A sync Engine needs a sync driver: psycopg's, whichever driver is under test.
    sync_engine = create_engine(url.set(drivername="postgresql+psycopg"))
    try:
        await asyncio.to_thread(upgrade, sync_engine)
        pool = sync_engine.pool
        assert isinstance(pool, QueuePool)
        assert pool.checkedout() == 0, "env.py left its connection open"
    finally:
        await asyncio.to_thread(sync_engine.dispose)


async def _given_async_engine_from_sync_code(_: AsyncEngine, url: URL) -> None:
    # A thread without a running loop, as pytest-alembic's sync tests are.
    manager = DatabaseSessionManager()
    manager.init(url=url)
    try:
        await asyncio.to_thread(upgrade, manager.engine)
        # env.py's loop ended with the command: had its connection gone back to the
        # pool, the engine's next user, on this loop, would be handed a dead one
        # (asyncpg's; a psycopg connection survives the move).
        async with manager.engine.connect() as connection:
            assert await connection.scalar(text("SELECT 1")) == 1
    finally:
        await manager.close()


async def _given_async_engine_in_run_sync(engine: AsyncEngine, _: URL) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(lambda _: upgrade(engine))


@pytest.mark.parametrize(
    ("migrate", "commits"),
    [
        pytest.param(_given_connection, False, id="Connection"),
        pytest.param(_given_async_connection, False, id="AsyncConnection"),
        pytest.param(_given_engine, True, id="Engine"),
        pytest.param(_given_async_engine_from_sync_code, True, id="AsyncEngine-sync-caller"),
        pytest.param(_given_async_engine_in_run_sync, True, id="AsyncEngine-in-run_sync"),
    ],
)
async def test_env_py_migrates_each_kind_of_connection_it_is_given(
    engine: AsyncEngine,
    empty_database_url: URL,
    migrate: Callable[[AsyncEngine, URL], Awaitable[None]],
    commits: bool,
) -> None:
    """On an engine env.py commits its own connection; a connection's transaction is the caller's.

    The callers of Connection and AsyncConnection roll back: DDL is transactional
    on PostgreSQL, so the table survives only if env.py committed behind them.
    """
    await migrate(engine, empty_database_url)

    async with engine.connect() as connection:
        assert ("items" in await connection.run_sync(table_names)) is commits
    assert await _alembic_version_rows(engine) == int(commits)


async def test_an_async_engine_holding_another_loops_connections_is_refused_by_name(
    engine: AsyncEngine, empty_database_url: URL
) -> None:
    """From sync code, an engine that already served this loop would fail in the driver."""
    manager = DatabaseSessionManager()
    manager.init(url=empty_database_url)
    try:
        async with manager.engine.connect() as connection:  # leaves one idle in its pool
            await connection.scalar(text("SELECT 1"))
        with pytest.raises(RuntimeError, match=r"await engine\.dispose\(\)` first"):
            await asyncio.to_thread(upgrade, manager.engine)
    finally:
        await manager.close()
    async with engine.connect() as connection:
        assert "items" not in await connection.run_sync(table_names)


async def test_upgrade_head_from_empty_creates_items_with_named_constraints(
    engine: AsyncEngine,
) -> None:
    """`upgrade head` names the constraints pk_items and uq_items_name.

    Later migrations drop constraints by these names; autogenerate, and so
    pytest-alembic's test_model_definitions_match_ddl, ignores a primary key's name.
    """
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
