"""The variants built from what the main venv has: raw, the seed pattern, ours, ours_read.

Each factory takes the URL (its driver, `postgresql+asyncpg` or `postgresql+psycopg`,
and where to connect: the server or PgBouncer) and whether a transaction pooler
is in the way (ours and ours_read also take the replicas their reads may use), and
returns a fresh FastAPI app whose lifespan opens and closes its pool, so the same
code serves in-process calls and a real uvicorn server.
"""

# No `from __future__ import annotations`: FastAPI resolves a route's annotations
# in the module's globals, where the closures' local dependencies are not found.

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
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

# The manager waits CLOSE_GRACE_SECONDS (10 s) for units in use before it cuts them.
CLOSE_TIMEOUT_SECONDS = 30.0


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


def ours_app(url: URL, pooled: bool, replica_urls: Sequence[URL] = ()) -> FastAPI:
    """(c) This repository's package: its defaults, its dependency, on a manager of our own.

    Behind a pooler, `transaction_pooler=True`, as its README says; nothing else. With
    `replica_urls` (the `replica` deployment) every unit still runs on the primary, as
    AsyncSessionDep's do, and pays what remembering its commit's WAL position costs.
    """
    manager = DatabaseSessionManager()
    return add_session_routes(
        FastAPI(lifespan=_managing(manager, url, pooled, replica_urls)),
        Depends(_session_dependency(manager, read_only=False), scope="function"),
    )


def ours_read_app(url: URL, pooled: bool, replica_urls: Sequence[URL] = ()) -> FastAPI:
    """(c') Ours as a read-heavy app would use it: GET through ReadSessionDep, POST as ours.

    The GET's unit is `session(read_only=True)`: one read-only implicit transaction per
    statement, on a replica when `replica_urls` names one that can serve it.
    """
    manager = DatabaseSessionManager()
    return add_session_routes(
        FastAPI(lifespan=_managing(manager, url, pooled, replica_urls)),
        Depends(_session_dependency(manager, read_only=False), scope="function"),
        read_depends=Depends(_session_dependency(manager, read_only=True), scope="function"),
    )


def _session_dependency(
    manager: DatabaseSessionManager, *, read_only: bool
) -> Callable[[], AsyncIterator[AsyncSession]]:
    """What app/database/_fastapi.py's get_db (or get_read_db) does, on `manager` instead
    of the global one."""

    async def get_db() -> AsyncIterator[AsyncSession]:
        async with manager.session(read_only=read_only) as session:
            yield session

    return get_db


def _managing(
    manager: DatabaseSessionManager, url: URL, pooled: bool, replica_urls: Sequence[URL]
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """A lifespan that opens `manager` on `url` (and its replicas) and closes it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        manager.init(
            url,
            transaction_pooler=pooled,
            replica_urls=list(replica_urls),
            # The package's default shape, a fixed pool, at the capacity every variant
            # has. 5 + 10 overflow, now taken as given, would close and reopen overflow
            # connections under load, as SQLAlchemy's QueuePool does for the peers.
            pool_size=POOL_CAPACITY,
            max_overflow=0,
        )
        try:
            if replica_urls:
                # The start-up probe the package offers: without it the first reads
                # go to the primary until the background probe has seen the replica.
                await manager.verify_replicas()
            yield
        finally:
            await _close(manager)

    return lifespan


async def _close(manager: DatabaseSessionManager) -> None:
    """`manager.close()`, or an error if it has not returned within CLOSE_TIMEOUT_SECONDS.

    With replicas, close() waits for its probe task to end, and that task has been
    seen to ignore its cancellation (Python 3.11): a run then fails here, saying
    so, instead of hanging.
    """
    closing = asyncio.ensure_future(manager.close())
    done, _ = await asyncio.wait({closing}, timeout=CLOSE_TIMEOUT_SECONDS)
    if not done:
        raise RuntimeError(
            f"DatabaseSessionManager.close() had not returned after {CLOSE_TIMEOUT_SECONDS:g} s"
        )
    closing.result()


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


def add_session_routes(app: FastAPI, depends: Any, read_depends: Any = None) -> FastAPI:
    """The two routes, the same for every variant whose session comes from `depends`
    (the GET's from `read_depends`, if given)."""
    get_depends = depends if read_depends is None else read_depends

    @app.get("/rows/{row_id}")
    async def get_row(row_id: int, session: Annotated[AsyncSession, get_depends]) -> RowOut:
        row = (await session.execute(SELECT_ROW_TEXT, {"id": row_id})).mappings().one_or_none()
        if row is None:
            raise HTTPException(404, "no such row")
        return row_out(row)

    @app.post("/rows", status_code=201)
    async def add_row(body: RowIn, session: Annotated[AsyncSession, depends]) -> Created:
        row_id = await session.scalar(INSERT_ROW_TEXT, {"name": body.name, "amount": body.amount})
        return Created(id=row_id)

    return app
