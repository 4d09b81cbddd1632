"""What the package's engine hooks must leave alone: the caller's own connect
listeners, and a close() that is itself cancelled."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import URL

from app.database import DatabaseSessionManager
from app.database._closing import CANCEL_REPEAT_PAUSES_SECONDS, POOLER_CANCEL_TIMEOUT_SECONDS
from app.database.drivers import driver_for
from tests.drivers import DRIVER, application_name
from tests.integration.held_connection import holding_a_connection, until
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


async def _running_a_statement(observer: asyncpg.Connection) -> bool:
    """Whether one of the test's backends is running a statement."""
    return await count_backends(observer, APPLICATION, state_like="active") == 1


async def test_a_cancelled_close_still_cuts_and_closes_every_connection(
    database_url: URL, observer: asyncpg.Connection
) -> None:
    """close() cancelled during its grace period still leaves no backend behind."""
    async with holding_a_connection(
        database_url,
        then=lambda db: db.execute(text("SELECT pg_sleep(30)")),
        pool_size=2,
        max_overflow=0,
        connect_args=application_name(APPLICATION),
    ) as holder:
        async with holder.manager.session() as db:  # one idle pooled connection
            await db.execute(text("SELECT 1"))
        holder.release()
        await until(lambda: _running_a_statement(observer), "the unit's pg_sleep(30) running")
        closing = asyncio.create_task(holder.manager.close(grace=30))
        await until(holder.draining, "close() waiting for the unit")
        closing.cancel()

        with pytest.raises(asyncio.CancelledError):
            await closing
        with pytest.raises(Exception, match="connection"):  # cut: a lost-connection error
            await asyncio.wait_for(holder.task, 5)
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


@pytest.mark.parametrize("transaction_pooler", [False, True], ids=["direct", "pooler"])
async def test_close_returns_once_the_cancel_of_a_connection_it_cut_was_sent(
    database_url: URL, monkeypatch: pytest.MonkeyPatch, transaction_pooler: bool
) -> None:
    """A connection cut inside a transaction gets its CancelRequest, and close() returns
    only once it was sent. Directly connected, the cut comes first (the unit fails at
    once) and the request goes twice more after pauses (one that comes before the
    backend has read its statement is ignored); through a transaction pooler the cancel
    comes first (PgBouncer forwards a cancel only while the client's connection is
    open), once."""
    driver = driver_for(DRIVER)
    assert driver is not None
    sent: list[str] = []

    def cancel_sender(_: Any, __: Any) -> Callable[[], Coroutine[Any, Any, None]]:
        async def send() -> None:
            # A request that takes a while: close() must wait for it, not race it.
            await asyncio.sleep(0.2)
            sent.append("cancel sent")

        return send

    cut = type(driver).cut

    def cut_and_note(self: Any, connection: Any) -> None:
        sent.append("cut")
        cut(self, connection)

    monkeypatch.setattr(type(driver), "cancel_sender", cancel_sender)
    monkeypatch.setattr(type(driver), "cut", cut_and_note)
    async with holding_a_connection(database_url, transaction_pooler=transaction_pooler) as holder:
        await holder.manager.close(grace=0)
        at_return = list(sent)

    repeated = ["cancel sent"] * (1 + len(CANCEL_REPEAT_PAUSES_SECONDS))
    expected = ["cancel sent", "cut"] if transaction_pooler else ["cut", *repeated]
    assert at_return == expected


async def test_a_connection_cut_outside_a_transaction_gets_no_cancel(
    database_url: URL, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checked-out connection whose backend is idle (no transaction) is cut without a
    CancelRequest: there is no statement to stop."""
    driver = driver_for(DRIVER)
    assert driver is not None
    requested: list[str] = []

    def cancel_sender(_: Any, __: Any) -> None:
        requested.append("cancel requested")

    monkeypatch.setattr(type(driver), "cancel_sender", cancel_sender)
    async with holding_a_connection(database_url, idle=True) as holder:
        cuts: list[str] = []
        event.listen(holder.manager.engine.sync_engine, "invalidate", lambda *_: cuts.append("cut"))
        await holder.manager.close(grace=0)

    assert cuts == ["cut"]
    assert requested == []
