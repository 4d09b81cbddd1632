"""A COMMIT left without an answer: its outcome is unknown, it says so, and it is never retried."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import (
    AsyncSessionDep,
    CommitOutcomeUnknownError,
    DatabaseErrorKind,
    DatabaseSessionManager,
    _fastapi,
    classify_error,
)
from app.errors import install_error_handlers
from app.models import Item
from tests.faults.proxy import CommitFault, FaultProxy
from tests.faults.server import FaultServer


@pytest.fixture(name="manager")
async def manager_fixture(
    fault_server: FaultServer, proxy: FaultProxy
) -> AsyncIterator[DatabaseSessionManager]:
    """A one-connection manager whose connections go through the fault proxy."""
    manager = DatabaseSessionManager()
    manager.init(url=fault_server.app_url(port=proxy.port), pool_size=1, max_overflow=0)
    yield manager
    await manager.close()


@pytest.mark.parametrize(
    ("fault", "stored"),
    [("drop", 0), ("ack_lost", 1)],
    ids=["commit-never-arrived", "answer-lost-after-commit"],
)
async def test_a_commit_left_unanswered_is_an_unknown_outcome_not_retried(
    manager: DatabaseSessionManager,
    fault_server: FaultServer,
    proxy: FaultProxy,
    fault: CommitFault,
    stored: int,
) -> None:
    """Whether or not COMMIT reached the server, the client cannot know: one attempt only."""
    name = f"outcome-{uuid.uuid4()}"
    calls = 0

    async def insert(db: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await db.execute(text("INSERT INTO items (name) VALUES (:name)"), {"name": name})

    proxy.on_commit(fault)
    with pytest.raises(CommitOutcomeUnknownError, match="may or may not have committed") as caught:
        await manager.run_in_transaction(insert, attempts=3)
    proxy.on_commit(None)

    assert calls == 1, "retried a COMMIT whose outcome was unknown: it could apply twice"
    assert caught.value.__cause__ is not None
    assert classify_error(caught.value) is DatabaseErrorKind.UNAVAILABLE
    async with manager.session() as db:  # a new connection: the proxy cut the old one
        count = await db.scalar(text("SELECT count(*) FROM items WHERE name = :n"), {"n": name})
    assert count == stored  # both outcomes happen: only the server knows which


async def test_the_service_answers_an_unknown_outcome_without_inviting_a_retry(
    manager: DatabaseSessionManager, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503 naming the doubt, and no Retry-After: resending blindly could store it twice."""
    monkeypatch.setattr(_fastapi, "session_manager", manager)
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/items")
    async def create(db: AsyncSessionDep) -> None:
        await db.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": f"{uuid.uuid4()}"})

    proxy.on_commit("ack_lost")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/items")
    proxy.on_commit(None)

    assert response.status_code == 503
    assert "may have been applied" in response.json()["detail"]
    assert "retry-after" not in response.headers


async def test_a_unit_that_cannot_connect_to_commit_is_no_unknown_outcome(
    manager: DatabaseSessionManager, proxy: FaultProxy
) -> None:
    """Nothing was sent: the write is flushed, and fails, before COMMIT; a plain 'unavailable'."""
    proxy.refuse()
    with pytest.raises(Exception) as caught:  # noqa: PT011 - examined below
        async with manager.session() as db:
            db.add(Item(name=f"never-{uuid.uuid4()}"))  # no statement until the commit
    proxy.restore()

    assert not isinstance(caught.value, CommitOutcomeUnknownError)
    assert classify_error(caught.value) is DatabaseErrorKind.UNAVAILABLE


async def test_a_read_only_transaction_whose_commit_is_lost_is_no_unknown_outcome(
    manager: DatabaseSessionManager, proxy: FaultProxy
) -> None:
    """It wrote nothing: a plain unavailable error (503, worth retrying), not an ambiguous one."""
    proxy.on_commit("ack_lost")
    try:
        with pytest.raises(Exception) as caught:  # noqa: PT011  (checked below)
            async with manager.session(read_only=True, isolation_level="REPEATABLE READ") as db:
                await db.scalar(text("SELECT count(*) FROM items"))
    finally:
        proxy.on_commit(None)
    assert not isinstance(caught.value, CommitOutcomeUnknownError), caught.value
    assert classify_error(caught.value) is DatabaseErrorKind.UNAVAILABLE
