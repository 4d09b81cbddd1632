"""The variants built from what the main venv has: raw, the seed pattern, ours.

Each factory takes the URL (its driver, `postgresql+asyncpg` or `postgresql+psycopg`,
and where to connect: the server or PgBouncer) and whether a transaction pooler
is in the way, and returns a fresh FastAPI app whose lifespan opens and closes its
pool, so the same code serves in-process calls and a real uvicorn server.
"""

# No `from __future__ import annotations`: FastAPI resolves a route's annotations
# in the module's globals, where the closures' local dependencies are not found.

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any
from uuid import uuid4

import asyncpg
from fastapi import Depends, FastAPI, HTTPException
from psycopg.conninfo import make_conninfo
from psycopg.rows import dict_row
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.database import DatabaseSessionManager

from .shape import (
    INSERT_ROW,
    INSERT_ROW_PSYCOPG,
    INSERT_ROW_TEXT,
    MAX_OVERFLOW,
    POOL_CAPACITY,
    POOL_SIZE,
    SELECT_ROW,
    SELECT_ROW_PSYCOPG,
    SELECT_ROW_TEXT,
    Created,
    RowIn,
    RowOut,
    row_out,
)


def pooler_connect_args(url: URL) -> dict[str, Any]:
    """What a SQLAlchemy user passes behind a transaction pooler, per driver.

    asyncpg: no statement cache (asyncpg's, nor the SQLAlchemy adapter's), and a
    unique name per prepared statement, SQLAlchemy's documented recipe; psycopg:
    never prepare on the server.
    """
    if url.get_driver_name() == "psycopg":
        return {"prepare_threshold": None}
    return {
        "statement_cache_size": 0,
        "prepared_statement_cache_size": 0,
        "prepared_statement_name_func": lambda: f"__asyncpg_{uuid4()}__",
    }


def raw_app(url: URL, pooled: bool) -> FastAPI:
    """(a) A driver's own pool and no SQLAlchemy at all: the floor every layer adds to."""
    if url.get_driver_name() == "psycopg":
        return _raw_psycopg_app(url, pooled)
    return _raw_asyncpg_app(url, pooled)


def _raw_asyncpg_app(url: URL, pooled: bool) -> FastAPI:
    """`asyncpg.create_pool`; behind a pooler without its statement cache."""
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    options: dict[str, Any] = {"statement_cache_size": 0} if pooled else {}
    pools: list[Any] = []  # asyncpg.Pool, once the lifespan has opened it

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(
            dsn, min_size=POOL_CAPACITY, max_size=POOL_CAPACITY, **options
        )
        pools.append(pool)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/rows/{row_id}")
    async def get_row(row_id: int) -> RowOut:
        async with pools[0].acquire() as connection:
            row = await connection.fetchrow(SELECT_ROW, row_id)
        if row is None:
            raise HTTPException(404, "no such row")
        return row_out(row)

    @app.post("/rows", status_code=201)
    async def add_row(body: RowIn) -> Created:
        async with pools[0].acquire() as connection:
            row_id = await connection.fetchval(INSERT_ROW, body.name, body.amount)
        return Created(id=row_id)

    return app


def _raw_psycopg_app(url: URL, pooled: bool) -> FastAPI:
    """psycopg_pool's `AsyncConnectionPool`, in autocommit as raw asyncpg runs.

    One statement per request, so autocommit commits it as asyncpg's implicit
    transaction does; psycopg's default would add a BEGIN and a COMMIT round trip.
    """
    # unused-ignore: the ignore is needed only where psycopg-pool is not installed.
    from psycopg_pool import (  # type: ignore[import-not-found, unused-ignore]
        AsyncConnectionPool,
    )

    conninfo = make_conninfo(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        dbname=url.database,
        user=url.username,
        password=url.password,
    )
    kwargs: dict[str, Any] = {"autocommit": True, "row_factory": dict_row}
    if pooled:
        kwargs["prepare_threshold"] = None
    pools: list[Any] = []  # AsyncConnectionPool, once the lifespan has opened it

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool = AsyncConnectionPool(
            conninfo, min_size=POOL_CAPACITY, max_size=POOL_CAPACITY, kwargs=kwargs, open=False
        )
        await pool.open(wait=True)
        pools.append(pool)
        try:
            yield
        finally:
            await pool.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/rows/{row_id}")
    async def get_row(row_id: int) -> RowOut:
        async with pools[0].connection() as connection:
            cursor = await connection.execute(SELECT_ROW_PSYCOPG, (row_id,))
            row = await cursor.fetchone()
        if row is None:
            raise HTTPException(404, "no such row")
        return row_out(row)

    @app.post("/rows", status_code=201)
    async def add_row(body: RowIn) -> Created:
        async with pools[0].connection() as connection:
            cursor = await connection.execute(INSERT_ROW_PSYCOPG, (body.name, body.amount))
            row = await cursor.fetchone()
        return Created(id=row["id"])

    return app


def seed_app(url: URL, pooled: bool) -> FastAPI:
    """(b) The naive seed pattern: pre-ping on, and the commit after the response."""
    engine = create_async_engine(
        url,
        pool_size=POOL_SIZE,
        max_overflow=MAX_OVERFLOW,
        pool_pre_ping=True,
        pool_recycle=3600,
        **pooler_engine_options(url, pooled),
    )
    factory = async_sessionmaker(engine, expire_on_commit=False)

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with factory() as session:
            try:
                yield session
                await session.commit()
            except BaseException:  # the seed's bare `except:`, spelled out
                await session.rollback()
                raise

    return add_session_routes(FastAPI(lifespan=disposing(engine)), Depends(get_db))


def ours_app(url: URL, pooled: bool) -> FastAPI:
    """(c) This repository's package: its defaults, its dependency, on a manager of our own.

    Behind a pooler, `transaction_pooler=True`, as its README says; nothing else.
    """
    manager = DatabaseSessionManager()

    # What app/database/_fastapi.py does, on this manager instead of the global one.
    async def get_db() -> AsyncIterator[AsyncSession]:
        async with manager.session() as session:
            yield session

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager.init(url, transaction_pooler=pooled, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
        try:
            yield
        finally:
            await manager.close()

    return add_session_routes(FastAPI(lifespan=lifespan), Depends(get_db, scope="function"))


def pooler_engine_options(url: URL, pooled: bool) -> dict[str, Any]:
    """`create_async_engine` options a SQLAlchemy user adds behind a transaction pooler."""
    return {"connect_args": pooler_connect_args(url)} if pooled else {}


def disposing(engine: AsyncEngine) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan that disposes of `engine` at shutdown, for variants that own one."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    return lifespan


def add_session_routes(app: FastAPI, depends: Any) -> FastAPI:
    """The two routes, the same for every variant whose session comes from `depends`."""

    @app.get("/rows/{row_id}")
    async def get_row(row_id: int, session: Annotated[AsyncSession, depends]) -> RowOut:
        row = (await session.execute(SELECT_ROW_TEXT, {"id": row_id})).mappings().one_or_none()
        if row is None:
            raise HTTPException(404, "no such row")
        return row_out(row)

    @app.post("/rows", status_code=201)
    async def add_row(body: RowIn, session: Annotated[AsyncSession, depends]) -> Created:
        row_id = await session.scalar(INSERT_ROW_TEXT, {"name": body.name, "amount": body.amount})
        return Created(id=row_id)

    return app
