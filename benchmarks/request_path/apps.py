"""The three variants built from what the main venv has: raw asyncpg, the seed pattern, ours.

Each factory returns a fresh FastAPI app whose lifespan opens and closes its pool,
so the same code serves in-process calls and a real uvicorn server.
"""

# No `from __future__ import annotations`: FastAPI resolves a route's annotations
# in the module's globals, where the closures' local dependencies are not found.

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, HTTPException
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
    INSERT_ROW_TEXT,
    MAX_OVERFLOW,
    POOL_CAPACITY,
    POOL_SIZE,
    SELECT_ROW,
    SELECT_ROW_TEXT,
    Created,
    RowIn,
    RowOut,
    row_out,
)


def raw_app(url: URL) -> FastAPI:
    """(a) An asyncpg pool and no SQLAlchemy at all: the floor every layer adds to."""
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    pools: list[Any] = []  # asyncpg.Pool, once the lifespan has opened it

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool = await asyncpg.create_pool(dsn, min_size=POOL_CAPACITY, max_size=POOL_CAPACITY)
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


def seed_app(url: URL) -> FastAPI:
    """(b) The naive seed pattern: pre-ping on, and the commit after the response."""
    engine = create_async_engine(
        url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW, pool_pre_ping=True, pool_recycle=3600
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


def ours_app(url: URL) -> FastAPI:
    """(c) This repository's package: its defaults, its dependency, on a manager of our own."""
    manager = DatabaseSessionManager()

    # What app/database/_fastapi.py does, on this manager instead of the global one.
    async def get_db() -> AsyncIterator[AsyncSession]:
        async with manager.session() as session:
            yield session

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager.init(url, pool_size=POOL_SIZE, max_overflow=MAX_OVERFLOW)
        try:
            yield
        finally:
            await manager.close()

    return add_session_routes(FastAPI(lifespan=lifespan), Depends(get_db, scope="function"))


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
