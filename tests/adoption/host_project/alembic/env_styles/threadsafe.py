"""env.py that hands its coroutine to a running loop when it finds one.

A common style in services whose tests migrate from inside pytest-asyncio: on
the loop's own thread, `.result()` would wait for a loop it is blocking.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from shop import settings
from shop.models import Base

config = context.config
target_metadata = Base.metadata
MIGRATION_TIMEOUT_SECONDS = 15


def database_url() -> str:
    return config.get_main_option("sqlalchemy.url") or settings.database_url()


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    connectable = create_async_engine(database_url(), poolclass=pool.NullPool)
    async with connectable.connect() as connection:
        await connection.run_sync(do_run_migrations)
    await connectable.dispose()


try:
    loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
except RuntimeError:
    loop = None

if loop is not None and loop.is_running():
    future = asyncio.run_coroutine_threadsafe(run_migrations_online(), loop)
    future.result(timeout=MIGRATION_TIMEOUT_SECONDS)
else:
    asyncio.run(run_migrations_online())
