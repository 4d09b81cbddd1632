"""Alembic environment: runs migrations on the package's async engine.

The URL comes from DATABASE_URL (the service's own setting), unless the caller
set sqlalchemy.url in the Alembic config (the package's pytest plugin does, with
its test database: Alembic's own templates read it there). A caller may instead
put what to migrate in `config.attributes["connection"]`, as Alembic's cookbook
does: a Connection or an AsyncConnection is migrated as it is, its transaction and
its closing left to the caller; on an Engine or an AsyncEngine, env.py opens a
connection of its own, commits and closes it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.config import database_url
from app.database import DatabaseSessionManager
from app.models import Model

target_metadata = Model.metadata


def _url() -> str:
    return context.config.get_main_option("sqlalchemy.url") or database_url()


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    # Alembic begins and commits a transaction only when the connection is not
    # already in one: a caller's open transaction stays the caller's to end.
    with context.begin_transaction():
        context.run_migrations()


def _run_on_own_connection(engine: Engine) -> None:
    with engine.connect() as connection:
        _run_on(connection)
        # Its own connection: committed here, whether or not Alembic saw a
        # transaction of its own to commit.
        connection.commit()


async def _run_on_async_engine(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(_run_on)
        await connection.commit()


async def _run_on_async_engine_in_own_loop(engine: AsyncEngine) -> None:
    try:
        await _run_on_async_engine(engine)
    finally:
        # The connection belongs to the loop asyncio.run() made for this call,
        # which ends here: pooled, it would be handed, dead, to the engine's next
        # user. SQLAlchemy's rule for an AsyncEngine moving between loops is
        # dispose(), which closes the idle connections on this loop while it runs
        # (Connection.detach() would not: an async driver's detached connection is
        # dropped unclosed, or with asyncpg terminated).
        await engine.dispose()


async def _run_with_own_engine() -> None:
    # A private manager, so running migrations never touches the app's singleton.
    manager = DatabaseSessionManager()
    manager.init(url=_url())
    try:
        await _run_on_async_engine(manager.engine)
    finally:
        await manager.close()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_on_given(given: Any) -> None:
    if isinstance(given, (AsyncEngine, AsyncConnection)) and _loop_running():
        # Alembic calls env.py synchronously, so a loop running in this thread
        # cannot be awaited from here: asyncio.run() refuses, and so would any wait.
        # Inside run_sync() (a greenlet SQLAlchemy runs from that loop) the sync
        # face of an async engine or connection works, its driver's awaits being
        # handed back to the loop; from plain sync code called by a coroutine,
        # SQLAlchemy raises MissingGreenlet: run Alembic through run_sync().
        given = given.sync_engine if isinstance(given, AsyncEngine) else given.sync_connection
    if isinstance(given, AsyncEngine):
        # No loop running here (pytest-alembic calls env.py from sync code): one of
        # our own, for this call. The engine must not hold connections of another
        # loop then (SQLAlchemy's rule, as above): they would fail deep in the driver.
        idle = getattr(given.sync_engine.pool, "checkedin", lambda: 0)()
        if idle:
            raise RuntimeError(
                f"this AsyncEngine's pool holds {idle} connection(s) opened on another "
                "event loop, unusable from the loop env.py makes for this call: "
                "`await engine.dispose()` first, or run Alembic inside that loop "
                "through `await connection.run_sync(...)`"
            )
        asyncio.run(_run_on_async_engine_in_own_loop(given))
    elif isinstance(given, AsyncConnection):
        # Opened on a loop that is not running now: no await could reach it.
        raise RuntimeError(
            "an AsyncConnection can only be migrated from inside its own loop: call "
            "Alembic through `await connection.run_sync(...)`, or pass its AsyncEngine"
        )
    elif isinstance(given, Engine):
        _run_on_own_connection(given)
    elif isinstance(given, Connection):
        _run_on(given)
    elif callable(getattr(given, "connect", None)):
        # Engine-like, e.g. pytest-alembic's WrappingConnection, whose connect()
        # hands back the caller's own connection inside a transaction it will roll
        # back: so no commit here (Alembic commits only a transaction it began).
        with given.connect() as connection:
            _run_on(connection)
    else:
        raise TypeError(
            'config.attributes["connection"] must be a Connection, AsyncConnection, '
            f"Engine or AsyncEngine, not {type(given).__name__}"
        )


def _run_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
elif (given := context.config.attributes.get("connection")) is not None:
    _run_on_given(given)
else:
    asyncio.run(_run_with_own_engine())
