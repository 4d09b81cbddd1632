"""What the package's engine hooks must leave alone: the caller's own connect
listeners, and a close() that is itself cancelled."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import URL

from app.database import DatabaseSessionManager
from app.database._closing import POOLER_CANCEL_TIMEOUT_SECONDS
from tests.drivers import DRIVER, application_name
from tests.postgres import count_backends

APPLICATION = f"engine-hooks-{os.getpid()}"


async def test_the_callers_do_connect_listener_still_runs(database_url: URL) -> None:
    """A listener added after init() (a rotating-token recipe, say) sees every new connection."""
    manager = DatabaseSessionManager()
    manager.init(url=database_url)
    seen: list[Any] = []

    @event.listens_for(manager.engine.sync_engine, "do_connect")
    def remember(_: Any, __: Any, ___: Any, cparams: dict[str, Any]) -> None:
        seen.append(cparams.get("database", cparams.get("dbname")))  # asyncpg's, libpq's

    try:
        async with manager.session() as db:
            await db.execute(text("SELECT 1"))
    finally:
        await manager.close()
    assert seen == [database_url.database]


async def test_a_cancelled_close_still_cuts_and_closes_every_connection(
    database_url: URL, observer: asyncpg.Connection
) -> None:
    """close() cancelled during its grace period still leaves no backend behind."""
    manager = DatabaseSessionManager()
    manager.init(
        url=database_url,
        pool_size=2,
        max_overflow=0,
        connect_args=application_name(APPLICATION),
    )
    async with manager.session() as db:  # one idle pooled connection
        await db.execute(text("SELECT 1"))
    holding = asyncio.Event()

    async def hold_a_connection() -> None:
        async with manager.session() as db:
            await db.execute(text("SELECT 1"))
            holding.set()
            await db.execute(text("SELECT pg_sleep(30)"))

    holder = asyncio.create_task(hold_a_connection())
    await holding.wait()
    closing = asyncio.create_task(manager.close(grace=30))
    await asyncio.sleep(0.2)
    closing.cancel()

    with pytest.raises(asyncio.CancelledError):
        await closing
    with pytest.raises(Exception, match="connection"):  # cut: a lost-connection error
        await asyncio.wait_for(holder, 5)
    for _ in range(100):  # backends exit asynchronously
        if await count_backends(observer, APPLICATION) == 0:
            break
        await asyncio.sleep(0.02)
    assert await count_backends(observer, APPLICATION) == 0


@pytest.mark.skipif(DRIVER != "psycopg", reason="psycopg's own waits with a timeout")
async def test_a_psycopg_wait_with_its_own_timeout_is_not_a_statement_timeout(
    database_url: URL,
) -> None:
    """notifies(timeout=...) ends as psycopg says; only the package's bound cuts a connection."""
    manager = DatabaseSessionManager()
    manager.init(url=database_url, transaction_pooler=True)
    try:
        async with manager.engine.connect() as connection:
            raw = await connection.get_raw_connection()
            psycopg_connection: Any = raw.driver_connection
            # Longer behind a pooler: PgBouncer 1.18 exits on a cancel closed early.
            assert psycopg_connection.cancel_timeout == POOLER_CANCEL_TIMEOUT_SECONDS
            await psycopg_connection.set_autocommit(True)
            await psycopg_connection.execute("SELECT 1")
            received = [n async for n in psycopg_connection.notifies(timeout=0.2)]
            assert received == []
            assert not psycopg_connection.closed
            await psycopg_connection.set_autocommit(False)
    finally:
        await manager.close()
