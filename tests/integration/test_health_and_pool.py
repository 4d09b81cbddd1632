"""/health and pool hygiene, on the real session_manager (no rollback fixture)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

import app.health
from app.database import DatabaseSessionManager
from app.main import create_app
from tests.postgres import checked_out


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
    assert body["pool"]["size"] == 5


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
    assert response.json()["status"] == "unavailable"
    assert "secret" not in response.text


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
    idle_in_transaction = await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
    )
    assert idle_in_transaction == 0
    assert await observer.fetchval("SELECT count(*) FROM items") == 20
