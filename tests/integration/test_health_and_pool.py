"""/health and pool hygiene, on the real session_manager (no rollback fixture)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

import app.health
from app.database import DatabaseSessionManager
from app.main import create_app
from tests.postgres import checked_out, idle_in_transaction


@pytest.fixture(name="live_client")
async def live_client_fixture(
    committed_db: DatabaseSessionManager,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the reference app using the real get_db: its commits are real."""
    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


async def test_health_reports_ok_and_pool_counters(live_client: httpx.AsyncClient) -> None:
    """/health makes a round trip and reports the pool's counters."""
    response = await live_client.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["database"]) == ("ok", "ok")
    assert body["pool"]["checkedout"] == 0
    # The package's default, a fixed pool of 15: see the package README's "Defaults".
    assert body["pool"]["size"] == 15


async def test_health_is_503_when_the_database_does_not_answer(
    live_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With nothing listening at the database address, /health answers 503 quickly."""
    unreachable = DatabaseSessionManager()
    unreachable.init(url="postgresql+asyncpg://app:secret@127.0.0.1:1/none")
    monkeypatch.setattr(app.health, "session_manager", unreachable)
    try:
        response = await live_client.get("/health")
    finally:
        await unreachable.close()

    assert response.status_code == 503
    # Only the error's class: its text could carry host names or SQL.
    assert response.json() == {"status": "unavailable", "database": "ConnectionRefusedError"}


async def test_health_gives_up_after_its_timeout(
    live_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that accepts connections but never answers gets a 503, not a hang."""
    accepted: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    silent = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    hanging = DatabaseSessionManager()
    hanging.init(url=f"postgresql+asyncpg://app@127.0.0.1:{port}/none")
    monkeypatch.setattr(app.health, "session_manager", hanging)
    monkeypatch.setattr(app.health, "HEALTH_TIMEOUT_SECONDS", 0.2)
    try:
        started = time.monotonic()
        response = await live_client.get("/health")
        elapsed = time.monotonic() - started
    finally:
        await hanging.close()
        for writer in accepted:
            writer.close()
        silent.close()
        await silent.wait_closed()

    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "TimeoutError"}
    # Generous bound: it only has to show the 0.2 s timeout cut the 60 s connect short.
    assert elapsed < 10


async def test_concurrent_requests_leave_no_connection_or_transaction_open(
    live_client: httpx.AsyncClient,
    committed_db: DatabaseSessionManager,
    observer: asyncpg.Connection,
) -> None:
    """After a burst of successes and failures, nothing is checked out or idle in transaction."""
    requests = [live_client.post("/items", json={"name": f"burst-{n % 20}"}) for n in range(40)]
    requests += [live_client.get(f"/items/{n}") for n in range(1000, 1020)]

    statuses = [response.status_code for response in await asyncio.gather(*requests)]

    assert sorted(set(statuses)) == [201, 404, 409]
    assert statuses.count(201) == 20
    assert checked_out(committed_db) == 0
    assert await idle_in_transaction(observer) == 0
    assert await observer.fetchval("SELECT count(*) FROM items") == 20
