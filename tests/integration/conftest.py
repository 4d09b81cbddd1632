"""Integration fixtures on real PostgreSQL.

Most tests use the rollback pattern: `db_session` lives inside an outer
transaction that is rolled back after the test, and route code's `commit()`
only releases a savepoint. Tests that must prove a real COMMIT use
`committed_db`, which truncates what they wrote.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import DatabaseSessionManager, get_db, session_manager
from app.main import create_app
from tests.migrations import upgrade
from tests.postgres import asyncpg_dsn, checked_out, create_database, drop_database, url_under_test


@pytest.fixture(scope="session", name="database_url")
async def database_url_fixture() -> AsyncIterator[URL]:
    """The suite's own database, created for this run and dropped after it."""
    url = url_under_test()
    assert url.database, "TEST_DATABASE_URL must name a database"
    await create_database(url, url.database)
    yield url
    await drop_database(url, url.database)


@pytest.fixture(scope="session", name="database")
async def database_fixture(database_url: URL) -> AsyncIterator[DatabaseSessionManager]:
    """The app's `session_manager`, open on the test database migrated to head."""
    session_manager.init(url=database_url)
    async with session_manager.engine.begin() as connection:
        await connection.run_sync(upgrade)
    yield session_manager
    # Zero cleanup must still mean zero residue: nothing any test wrote survived.
    async with session_manager.engine.connect() as connection:
        residue = await connection.scalar(text("SELECT count(*) FROM items"))
    await session_manager.close()
    assert residue == 0, f"{residue} rows persisted past the rollback fixture"


@pytest.fixture(name="db_session")
async def db_session_fixture(database: DatabaseSessionManager) -> AsyncIterator[AsyncSession]:
    """A session inside an outer transaction that is rolled back after the test."""
    async with database.engine.connect() as connection:
        outer = await connection.begin()
        # Deferred constraints would only fire at the COMMIT that never comes here:
        # check them per statement so a violation cannot pass silently.
        await connection.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))
        session = AsyncSession(
            bind=connection,
            expire_on_commit=False,
            join_transaction_mode="create_savepoint",
        )
        try:
            yield session
        finally:
            await session.close()
            await outer.rollback()


@pytest.fixture(name="client")
async def client_fixture(db_session: AsyncSession) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the reference app whose requests all use `db_session`."""
    app = create_app()

    async def session_in_test_transaction() -> AsyncIterator[AsyncSession]:
        # Mirror get_db: commit (here: release the savepoint) only if the route
        # returned, roll back its savepoint if it raised.
        try:
            yield db_session
        except BaseException:
            await db_session.rollback()
            raise
        await db_session.commit()

    app.dependency_overrides[get_db] = session_in_test_transaction
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
