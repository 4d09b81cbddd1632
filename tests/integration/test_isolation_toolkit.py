"""Meta-tests of the rollback isolation: after each test, a separate connection sees nothing.

Every test here requests `nothing_persists` first, so its check runs after the
isolation fixtures have rolled the test's transaction back.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import ForeignKey, func, select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncAttrs, AsyncConnection, AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload

from app.database import (
    AsyncSessionDep,
    DatabaseNotInitializedError,
    DatabaseSessionManager,
    TransactionAbortedError,
    get_db,
    get_read_db,
    session_manager,
)
from app.database.testing import (
    IsolationError,
    QueryCount,
    isolated,
    joined_session,
    share_session_with_app,
)
from app.models import Item

PROBE_TABLE = "isolation_ddl_probe"


@pytest.fixture(name="nothing_persists")
async def nothing_persists_fixture(
    database: DatabaseSessionManager, observer: asyncpg.Connection
) -> AsyncIterator[None]:
    """After the test's rollback, no item row and no table it created remain."""
    yield
    assert await observer.fetchval("SELECT count(*) FROM items") == 0
    scratch_tables = (
        "counter_probe_shelf",
        "counter_probe_book",
        "deferred_parent",
        "deferred_child",
    )
    for table in (PROBE_TABLE, *scratch_tables):
        assert await observer.fetchval("SELECT to_regclass($1)", table) is None


async def _names(session: AsyncSession) -> list[str]:
    return list(await session.scalars(select(Item.name).order_by(Item.id)))


async def test_commit_only_releases_a_savepoint(
    nothing_persists: None, db_session: AsyncSession, observer: asyncpg.Connection
) -> None:
    """commit() in the test is invisible to other connections and undone afterwards."""
    db_session.add(Item(name="committed"))
    await db_session.commit()

    assert await _names(db_session) == ["committed"]
    assert await observer.fetchval("SELECT count(*) FROM items") == 0


async def test_rollback_after_integrity_error_keeps_the_session_usable(
    nothing_persists: None, db_session: AsyncSession
) -> None:
    """After an IntegrityError and rollback(), the session keeps working in the test."""
    db_session.add(Item(name="kept"))
    await db_session.commit()
    db_session.add(Item(name="kept"))
    with pytest.raises(IntegrityError):
        await db_session.flush()
    await db_session.rollback()

    db_session.add(Item(name="after-rollback"))
    await db_session.flush()

    assert await _names(db_session) == ["kept", "after-rollback"]


async def test_nested_savepoints_roll_back_independently(
    nothing_persists: None, db_session: AsyncSession
) -> None:
    """begin_nested() inside the test's savepoint works as it does in production."""
    async with db_session.begin_nested():
        db_session.add(Item(name="outer-nested"))
        nested = await db_session.begin_nested()
        db_session.add(Item(name="inner-nested"))
        await db_session.flush()
        await nested.rollback()

    assert await _names(db_session) == ["outer-nested"]


async def test_ddl_is_rolled_back_too(
    nothing_persists: None, db_connection: AsyncConnection
) -> None:
    """A table created inside the test is gone afterwards (PostgreSQL DDL is transactional)."""
    await db_connection.execute(text(f"CREATE TABLE {PROBE_TABLE} (id int PRIMARY KEY)"))
    await db_connection.execute(text(f"INSERT INTO {PROBE_TABLE} VALUES (1)"))

    assert await db_connection.scalar(text(f"SELECT count(*) FROM {PROBE_TABLE}")) == 1


async def test_several_sessions_share_the_test_transaction(
    nothing_persists: None, db_session: AsyncSession, db_connection: AsyncConnection
) -> None:
    """Sessions from session_manager and extra joined sessions see each other's commits."""
    async with session_manager.session() as first:
        first.add(Item(name="from-manager"))
    async with joined_session(db_connection) as extra:
        extra.add(Item(name="from-extra"))
        await extra.commit()

    assert await _names(db_session) == ["from-manager", "from-extra"]


def _app_with_helper() -> FastAPI:
    app = FastAPI()

    async def record(name: str) -> None:
        # A helper that opens its own unit of work, as CLI code and jobs do.
        async with session_manager.session() as db:
            db.add(Item(name=name))

    @app.post("/items/{name}", status_code=201)
    async def create(db: AsyncSessionDep, name: str) -> dict[str, int]:
        db.add(Item(name=name))
        await record(f"{name}-audit")
        return {"count": await db.scalar(select(func.count()).select_from(Item)) or 0}

    return app


async def test_route_and_helper_sessions_are_isolated(
    nothing_persists: None, db_session: AsyncSession
) -> None:
    """A route (through get_db) and a helper calling session_manager.session() both join."""
    transport = httpx.ASGITransport(app=_app_with_helper())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/items/widget")

    assert response.status_code == 201
    assert sorted(await _names(db_session)) == ["widget", "widget-audit"]


async def test_route_error_rolls_back_only_its_own_savepoint(
    nothing_persists: None, db_session: AsyncSession, client: httpx.AsyncClient
) -> None:
    """A failing request leaves the test's earlier data in place and the session usable."""
    assert (await client.post("/items", json={"name": "dup"})).status_code == 201
    assert (await client.post("/items", json={"name": "dup"})).status_code == 409

    assert (await client.post("/items", json={"name": "after"})).status_code == 201
    assert await _names(db_session) == ["dup", "after"]


async def test_query_counter_counts_the_routes_statements(
    nothing_persists: None,
    client: httpx.AsyncClient,
    count_queries: Callable[[], AbstractContextManager[QueryCount]],
) -> None:
    """count_queries() sees a list request's two statements and not the harness's savepoints."""
    with count_queries() as queries:
        response = await client.get("/items")

    assert response.status_code == 200
    assert queries.count == 2, queries
    assert queries.statements[0].startswith("SELECT count(*)")
    assert "2 statements:\n  1. SELECT count(*)" in str(queries)


class _Scratch(AsyncAttrs, DeclarativeBase):
    """Models for this module only: kept off the app's Base, whose schema Alembic owns."""


class _Shelf(_Scratch):
    __tablename__ = "counter_probe_shelf"

    id: Mapped[int] = mapped_column(primary_key=True)
    books: Mapped[list[_Book]] = relationship()


class _Book(_Scratch):
    __tablename__ = "counter_probe_book"

    id: Mapped[int] = mapped_column(primary_key=True)
    shelf_id: Mapped[int] = mapped_column(ForeignKey(_Shelf.id))


async def test_query_counter_exposes_an_n_plus_one_load(
    nothing_persists: None,
    db_session: AsyncSession,
    db_connection: AsyncConnection,
    count_queries: Callable[[], AbstractContextManager[QueryCount]],
) -> None:
    """Lazy loading per row costs 1 + N statements; selectinload brings it back to 2."""
    await db_connection.run_sync(_Scratch.metadata.create_all)
    db_session.add_all([_Shelf(books=[_Book(), _Book()]) for _ in range(3)])
    await db_session.commit()
    db_session.expunge_all()

    with count_queries() as lazy:
        for shelf in await db_session.scalars(select(_Shelf)):
            await shelf.awaitable_attrs.books
    db_session.expunge_all()
    with count_queries() as eager:
        shelves = await db_session.scalars(select(_Shelf).options(selectinload(_Shelf.books)))
        assert sum(len(shelf.books) for shelf in shelves) == 6

    assert lazy.count == 1 + 3, lazy
    assert eager.count == 2, eager


def _app_swallowing_errors(share_with: AsyncSession | None) -> FastAPI:
    app = FastAPI()

    @app.post("/swallow", status_code=201)
    async def swallow(db: AsyncSessionDep) -> None:
        db.add(Item(name="lost-unless-refused"))
        await db.flush()
        # The mistake under test: route code swallowing a database error.
        with contextlib.suppress(DBAPIError):
            await db.execute(text("SELECT 1/0"))

    @app.post("/items/{name}", status_code=201)
    async def create(db: AsyncSessionDep, name: str) -> None:
        db.add(Item(name=name))

    if share_with is not None:
        share_session_with_app(app, share_with)
    return app


@pytest.mark.parametrize("shared", [False, True], ids=["joined", "shared-session"])
async def test_swallowed_error_fails_the_request_and_not_the_next(
    nothing_persists: None, db_session: AsyncSession, shared: bool
) -> None:
    """As in production, the request that swallowed an error fails; the next one works."""
    transport = httpx.ASGITransport(app=_app_swallowing_errors(db_session if shared else None))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(TransactionAbortedError):
            await client.post("/swallow")
        response = await client.post("/items/next-request")

    assert response.status_code == 201
    assert await _names(db_session) == ["next-request"]


async def test_outer_commit_is_refused_and_rolled_back(
    nothing_persists: None, db_connection: AsyncConnection
) -> None:
    """Committing the test's outer transaction would defeat isolation: it raises instead."""
    await db_connection.execute(text("INSERT INTO items (name) VALUES ('escaping')"))

    with pytest.raises(IsolationError, match=re.escape("commit a session instead")):
        await db_connection.commit()


DEFERRED_SCHEMA = [
    "CREATE TABLE deferred_parent (id int PRIMARY KEY)",
    "CREATE TABLE deferred_child (id int PRIMARY KEY, parent_id int NOT NULL"
    " REFERENCES deferred_parent (id) DEFERRABLE INITIALLY DEFERRED)",
]


async def test_deferred_constraints_stay_deferred_within_a_unit_of_work(
    nothing_persists: None, db_connection: AsyncConnection
) -> None:
    """A child inserted before its parent, as a deferred key allows, works in a test too."""
    for statement in DEFERRED_SCHEMA:
        await db_connection.execute(text(statement))

    async with session_manager.session() as db:
        await db.execute(text("INSERT INTO deferred_child VALUES (1, 10)"))
        await db.execute(text("INSERT INTO deferred_parent VALUES (10)"))

    assert await db_connection.scalar(text("SELECT count(*) FROM deferred_child")) == 1


async def test_deferred_violation_fails_at_the_end_of_the_test(
    nothing_persists: None, database: DatabaseSessionManager
) -> None:
    """A violation still deferred when the test ends is reported, not rolled away."""
    with pytest.raises(IntegrityError, match="deferred_child"):
        async with isolated(database) as connection:
            for statement in DEFERRED_SCHEMA:
                await connection.execute(text(statement))
            async with session_manager.session() as db:
                await db.execute(text("INSERT INTO deferred_child VALUES (1, 404)"))


async def test_manager_is_restored_after_an_error_in_isolation(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """After isolated() exits by an exception, session() commits for real again."""
    with pytest.raises(LookupError):
        async with isolated(committed_db):
            raise LookupError("test failed")

    async with committed_db.session() as db:
        db.add(Item(name="real-commit"))

    assert await observer.fetchval("SELECT count(*) FROM items") == 1


async def test_close_inside_isolation_is_not_undone(database_url: URL) -> None:
    """close() during isolation leaves the manager closed, not reconnected on exit."""
    manager = DatabaseSessionManager()
    manager.init(url=database_url)
    async with isolated(manager):
        await manager.close()

    with pytest.raises(DatabaseNotInitializedError, match="is closed"):
        async with manager.session():
            pass


async def _own_db() -> AsyncIterator[None]:
    yield None


async def test_sharing_a_session_ends_with_the_isolation(
    database: DatabaseSessionManager,
) -> None:
    """A module-level app gets its own overrides back when the test's transaction ends."""
    app = FastAPI()
    app.dependency_overrides[get_db] = _own_db  # the app's own, from before the test

    async with isolated(database) as connection, joined_session(connection) as session:
        undo = share_session_with_app(app, session)
        assert app.dependency_overrides[get_db] is not _own_db
        assert get_read_db in app.dependency_overrides

    assert app.dependency_overrides == {get_db: _own_db}
    undo()  # too late to matter, and harmless
    assert app.dependency_overrides == {get_db: _own_db}


async def test_undo_ends_sharing_before_the_isolation_does(
    database: DatabaseSessionManager,
) -> None:
    app = FastAPI()

    async with isolated(database) as connection, joined_session(connection) as session:
        share_session_with_app(app, session)()
        assert app.dependency_overrides == {}


async def test_ending_a_shared_session_keeps_a_later_override_of_the_tests_own(
    database: DatabaseSessionManager,
) -> None:
    """A test that overrides get_db itself after sharing keeps that override when the
    isolation ends; the read dependency's shared override is still removed."""
    app = FastAPI()

    async with isolated(database) as connection, joined_session(connection) as session:
        share_session_with_app(app, session)
        app.dependency_overrides[get_db] = _own_db  # the test's own, set after sharing

    assert app.dependency_overrides == {get_db: _own_db}
