"""Alembic environment: runs migrations on the package's async engine.

The URL comes from DATABASE_URL (the service's own setting). Tests may instead
pass an open connection in `config.attributes["connection"]`.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

import app.models  # noqa: F401  (registers the models on Base.metadata)
from app.config import database_url
from app.database import Base, DatabaseSessionManager

target_metadata = Base.metadata


def _run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    # A private manager, so running migrations never touches the app's singleton.
    manager = DatabaseSessionManager()
    manager.init(url=database_url())
    try:
        async with manager.engine.connect() as connection:
            await connection.run_sync(_run_on)
            await connection.commit()
    finally:
        await manager.close()


def _run_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    _run_offline()
elif (given := context.config.attributes.get("connection")) is not None:
    _run_on(given)
else:
    asyncio.run(_run_with_own_engine())
