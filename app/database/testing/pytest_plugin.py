"""pytest fixtures for tests isolated by rollback on a real PostgreSQL database.

Enable it with one line in your root `conftest.py` (with the module path the
package has in your service):

    pytest_plugins = ["app.database.testing.pytest_plugin"]

The run gets its own database, `<name>_<pid>_<random>` (one per xdist worker), on
the server `TEST_DATABASE_URL`, the `test_database_url` ini option or an override
of the `database_server_url` fixture names; it is migrated once and dropped at
the end. Each test that uses `db_session` (or `db_connection`) runs inside one
transaction that is rolled back afterwards.

This module holds the pytest hooks, ini options and fixtures; `_alembic.py` runs
the service's migrations for the `database_migrate` fixture.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import MetaData, func, select, table
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.pool import QueuePool

from .._base import Base
from .._manager import DatabaseSessionManager, session_manager
from .._on_commit import OnCommitCallback
from . import (
    DatabaseSetupError,
    QueryCount,
    capture_on_commit_callbacks,
    count_queries,
    create_test_database,
    drop_test_database,
    isolated,
    joined_session,
)
from ._alembic import alembic_config_files, alembic_upgrade_head, list_tables

# This module's path as the service named it (the folder may live anywhere), for
# messages that tell the user what to change.
PLUGIN = __name__
URL_VARIABLE = "TEST_DATABASE_URL"
LOOP_SCOPE_OPTIONS = ("asyncio_default_fixture_loop_scope", "asyncio_default_test_loop_scope")
# How long `alembic upgrade head` may take before the run stops with a message,
# rather than hang on an env.py waiting for something that never comes.
MIGRATION_TIMEOUT_SECONDS = 60.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "test_database_url",
        "database URL for the test run; TEST_DATABASE_URL overrides it. The run "
        "creates and drops <name>_<pid>_<random> on that server.",
    )
    parser.addini(
        "database_migrate_timeout",
        "seconds `alembic upgrade head` may take before the run stops "
        f"(default {MIGRATION_TIMEOUT_SECONDS:g})",
    )


# tryfirst: ahead of pytest-asyncio's own check, whose warning about an unset fixture
# loop scope is an INTERNALERROR under `filterwarnings = error`.
@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # The engine lives for the whole run on the session's event loop (the fixtures
    # below say so themselves); a test, or an async fixture of the project's own, on
    # another loop would fail deep in the driver ("attached to a different loop",
    # "another operation is in progress"), so refuse that before anything runs.
    try:
        scopes = {option: config.getini(option) for option in LOOP_SCOPE_OPTIONS}
    except ValueError:
        raise pytest.UsageError(f"{PLUGIN} needs pytest-asyncio >= 1.0: install it") from None
    wrong = [
        f'{option} = "session" (now {"unset" if scope is None else repr(scope)})'
        for option, scope in scopes.items()
        if scope != "session"
    ]
    if wrong:
        raise pytest.UsageError(
            f"{PLUGIN} shares one engine, on one event loop, "
            f"across the run: set {' and '.join(wrong)} in your pytest configuration"
        )


@pytest.fixture(scope="session", name="database_server_url")
def database_server_url_fixture(request: pytest.FixtureRequest) -> str | URL:
    """The server, user and base name of the run's database.

    `TEST_DATABASE_URL`, else the `test_database_url` ini option. Override this
    fixture to derive it from your service's own settings instead.
    """
    configured: str = os.environ.get(URL_VARIABLE) or request.config.getini("test_database_url")
    if not configured:
        raise pytest.UsageError(
            f"{PLUGIN} needs a PostgreSQL server for the test database: set "
            f"{URL_VARIABLE}=postgresql+asyncpg://USER@HOST:PORT/NAME, or test_database_url "
            "in your pytest configuration, or override the database_server_url fixture"
        )
    return configured


@pytest_asyncio.fixture(scope="session", loop_scope="session", name="database_url")
async def database_url_fixture(
    request: pytest.FixtureRequest, database_server_url: str | URL
) -> AsyncIterator[URL]:
    """This process's own database, created for the run and dropped after it."""
    base = make_url(database_server_url)
    # pid and a random part: unique per xdist worker, and across CI jobs whose
    # processes share a server (pids repeat across containers).
    suffix = f"{os.getpid()}_{secrets.token_hex(2)}"
    url = base.set(database=f"{base.database or 'test'}_{suffix}")
    try:
        await create_test_database(url)
    except DatabaseSetupError as error:
        message = (
            f"{error}. Point {URL_VARIABLE} (or test_database_url, or the "
            "database_server_url fixture) at a PostgreSQL server where the user may "
            "create databases."
        )
        if hasattr(request.config, "workerinput"):
            # pytest.exit() in an xdist worker loses the message (an INTERNALERROR).
            pytest.fail(message, pytrace=False)
        pytest.exit(message, returncode=3)
    yield url
    await drop_test_database(url)


@pytest.fixture(scope="session", name="database_metadata")
def database_metadata_fixture() -> MetaData:
    """The metadata whose tables `create_all` builds when there is no alembic.ini.

    The package's `Base.metadata`; override it to return your own `Base.metadata`.
    """
    return Base.metadata


def _migration_timeout(config: pytest.Config) -> float:
    configured = config.getini("database_migrate_timeout")
    if not configured:
        return MIGRATION_TIMEOUT_SECONDS
    try:
        seconds = float(configured)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise pytest.UsageError(
            f"database_migrate_timeout must be a number of seconds > 0, got {configured!r}"
        )
    return seconds


@pytest.fixture(scope="session", name="database_migrate")
def database_migrate_fixture(
    request: pytest.FixtureRequest, database_url: URL, database_metadata: MetaData
) -> Callable[[Connection], None]:
    """How the schema is built, once per run: Alembic if configured, else create_all.

    Alembic when the rootdir has an alembic.ini or a [tool.alembic] section in
    pyproject.toml. Override this fixture to build it another way: return a
    function of a sync `Connection` to the test database.
    """
    files = alembic_config_files(Path(request.config.rootpath))
    if files is not None:
        timeout = _migration_timeout(request.config)
        return lambda connection: alembic_upgrade_head(connection, files, database_url, timeout)
    if not database_metadata.tables:
        pytest.fail(
            f"{PLUGIN}: no Alembic configuration in {request.config.rootpath} and no "
            "table in the database_metadata fixture's metadata (the package's Base, "
            "unless overridden), so there is no schema to build: override "
            "database_metadata to return your models' Base.metadata, or "
            "database_migrate to build it another way",
            pytrace=False,
        )
    return database_metadata.create_all


@pytest.fixture(scope="session", name="database_manager")
def database_manager_fixture() -> DatabaseSessionManager:
    """The manager the code under test uses; override it if that is not `session_manager`."""
    return session_manager


def _row_counts(connection: Connection) -> dict[str, int]:
    # Every table the database has, not only those of some metadata: a service's
    # models may live on a Base of its own, and a test may create a table.
    counts: dict[str, int] = {}
    for schema, name in list_tables(connection):
        query = select(func.count()).select_from(table(name, schema=schema))
        counts[name if schema is None else f"{schema}.{name}"] = connection.scalar(query) or 0
    return counts


def _residue(seeded: dict[str, int], counts: dict[str, int]) -> list[str]:
    """What the tests left committed, compared with what the schema build left."""
    rows = {
        name: count - seeded.get(name, 0)
        for name, count in counts.items()
        if count != seeded.get(name, 0)
    }
    created = sorted(set(counts) - set(seeded))
    dropped = sorted(set(seeded) - set(counts))
    found = [f"rows persisted past the rollback isolation: {rows}"] if rows else []
    found += [f"tables created past it: {created}"] if created else []
    found += [f"tables dropped past it: {dropped}"] if dropped else []
    return found


@pytest_asyncio.fixture(scope="session", loop_scope="session", name="database")
async def database_fixture(
    database_url: URL,
    database_manager: DatabaseSessionManager,
    database_migrate: Callable[[Connection], None],
) -> AsyncIterator[DatabaseSessionManager]:
    """The manager, open on the migrated test database; checks nothing persisted at the end."""
    database_manager.init(url=database_url)
    try:
        async with database_manager.engine.begin() as connection:
            await connection.run_sync(database_migrate)
            # Rows the migrations seed are not residue.
            seeded = await connection.run_sync(_row_counts)
        yield database_manager
        # Zero cleanup must still mean zero residue.
        async with database_manager.engine.connect() as connection:
            counts = await connection.run_sync(_row_counts)
    finally:
        # No grace: the tests are over, and each test's leak check has already
        # reported any connection a test left checked out.
        await database_manager.close(grace=0)
    residue = _residue(seeded, counts)
    assert not residue, (
        "; ".join(residue) + ": a test committed outside db_session and db_connection "
        "(e.g. through session_manager.engine)"
    )


def _checked_out(manager: DatabaseSessionManager) -> int:
    pool = manager.engine.pool
    return pool.checkedout() if isinstance(pool, QueuePool) else 0


@pytest_asyncio.fixture(loop_scope="session", name="db_connection")
async def db_connection_fixture(
    database: DatabaseSessionManager,
) -> AsyncIterator[AsyncConnection]:
    """The test's outer transaction; every session of the manager joins it meanwhile."""
    before = _checked_out(database)
    async with isolated(database) as connection:
        yield connection
    # Compared with before the test, so that one leak is blamed on one test only.
    leaked = _checked_out(database) - before
    if leaked > 0:
        pytest.fail(
            f"{leaked} connection(s) still checked out after the test: close what it "
            "opens, e.g. with `async with engine.connect() as connection:`",
            pytrace=False,
        )


@pytest_asyncio.fixture(loop_scope="session", name="db_session")
async def db_session_fixture(db_connection: AsyncConnection) -> AsyncIterator[AsyncSession]:
    """A session inside the test's transaction; its commit() releases a savepoint."""
    async with joined_session(db_connection) as session:
        yield session


@pytest.fixture(name="count_queries")
def count_queries_fixture(
    db_connection: AsyncConnection,
) -> Callable[[], AbstractContextManager[QueryCount]]:
    """`with count_queries() as queries:` records the statements the test's code runs."""

    def counter() -> AbstractContextManager[QueryCount]:
        return count_queries(db_connection)

    return counter


@pytest.fixture(name="capture_on_commit_callbacks")
def capture_on_commit_callbacks_fixture(
    db_connection: AsyncConnection,
) -> Callable[..., AbstractAsyncContextManager[list[OnCommitCallback]]]:
    """`async with capture_on_commit_callbacks(execute=False) as callbacks:` sees `on_commit`.

    The callbacks registered by sessions that committed in the block (under the
    isolation their COMMIT never happens, so they would not run), in order; with
    `execute=True` they run at the block's end, with those they register.
    """

    def capture(*, execute: bool = False) -> AbstractAsyncContextManager[list[OnCommitCallback]]:
        return capture_on_commit_callbacks(db_connection, execute=execute)

    return capture
