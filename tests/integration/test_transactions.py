"""Per-unit isolation and flags, and RetryingRoute's attempts (issue 11).

The retries of run_in_transaction, and the proofs under real contention (write
skew, transfers, deadlocks), are in test_conflict_retries.py. Here a deferred
constraint trigger fails a chosen attempt's COMMIT with a serialization failure
(40001), the one failure a client cannot see coming.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy import event, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import (
    AsyncSessionDep,
    DatabaseConfigError,
    DatabaseErrorKind,
    DatabaseSessionManager,
    RetryingRoute,
    _fastapi,
    classify_error,
    retrying_route_class,
    session_dependency,
)
from tests.integration.forced_conflicts import drop_fail_commit, fail_commit_when
from tests.postgres import checked_out

# Rows inserted with fail_commit = true make their transaction's COMMIT fail with 40001.
INSERT = text("INSERT INTO tx_marks (note, fail_commit) VALUES (:note, :fail)")
COUNT = text("SELECT count(*) FROM tx_marks WHERE note = :note")


@pytest.fixture(name="manager")
async def manager_fixture(
    database_url: URL, observer: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[DatabaseSessionManager]:
    """A one-connection manager (so a session left open would block the next), with tx_marks."""
    await drop_fail_commit(observer, "tx_marks")
    await observer.execute(
        "DROP TABLE IF EXISTS tx_marks;"
        " CREATE TABLE tx_marks (id serial PRIMARY KEY, note text, fail_commit boolean NOT NULL)"
    )
    await fail_commit_when(observer, "tx_marks", "fail_commit")
    manager = DatabaseSessionManager()
    manager.init(url=database_url, pool_size=1, max_overflow=0, pool_timeout=2)
    monkeypatch.setattr(_fastapi, "session_manager", manager)
    try:
        yield manager
    finally:
        await manager.close()
        await drop_fail_commit(observer, "tx_marks")
        await observer.execute("DROP TABLE tx_marks")


async def _stored(manager: DatabaseSessionManager, note: str) -> int:
    async with manager.session() as db:
        return int(await db.scalar(COUNT, {"note": note}) or 0)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ("read committed", "off", "off")),
        ({"isolation_level": "SERIALIZABLE"}, ("serializable", "off", "off")),
        ({"isolation_level": "repeatable_read"}, ("repeatable read", "off", "off")),
        ({"read_only": True}, ("read committed", "on", "off")),
        (
            {"isolation_level": "SERIALIZABLE", "read_only": True, "deferrable": True},
            ("serializable", "on", "on"),
        ),
    ],
    ids=["default", "serializable", "repeatable-read", "read-only", "serializable-deferrable"],
)
async def test_a_units_isolation_and_flags_apply_to_it_alone(
    manager: DatabaseSessionManager, options: dict[str, object], expected: tuple[str, str, str]
) -> None:
    """Inside the unit the server reports them; the next unit on the same connection is default."""
    probe = text(
        "SELECT current_setting('transaction_isolation'),"
        " current_setting('transaction_read_only'), current_setting('transaction_deferrable')"
    )
    async with manager.session(**options) as db:  # type: ignore[arg-type]
        inside = tuple((await db.execute(probe)).one())
    async with manager.session() as db:
        after = tuple((await db.execute(probe)).one())

    assert inside == expected
    assert after == ("read committed", "off", "off")


async def test_a_read_only_unit_refuses_writes(manager: DatabaseSessionManager) -> None:
    """read_only=True: PostgreSQL refuses the INSERT (25006), nothing is stored."""
    with pytest.raises(DBAPIError) as caught:
        async with manager.session(read_only=True) as db:
            await db.execute(INSERT, {"note": "read-only", "fail": False})
    assert classify_error(caught.value) is DatabaseErrorKind.UNAVAILABLE  # 25006
    assert await _stored(manager, "read-only") == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"isolation_level": "SNAPSHOT"}, "isolation_level must be one of"),
        ({"isolation_level": "AUTOCOMMIT"}, "isolation_level must be one of"),
        ({"read_only": "yes"}, "read_only must be True or False"),
        ({"deferrable": True}, "deferrable=True only has an effect"),
    ],
)
async def test_bad_options_are_refused_before_anything_runs(
    manager: DatabaseSessionManager, options: dict[str, object], message: str
) -> None:
    """session(), run_in_transaction() and session_dependency() refuse them up front."""
    calls, checkouts = 0, []
    event.listen(manager.engine.sync_engine, "checkout", lambda *_: checkouts.append(1))

    async def work(_: AsyncSession) -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(DatabaseConfigError, match=message):
        async with manager.session(**options):  # type: ignore[arg-type]
            calls += 1
    with pytest.raises(DatabaseConfigError, match=message):
        await manager.run_in_transaction(work, **options)  # type: ignore[arg-type]
    with pytest.raises(DatabaseConfigError, match=message):
        session_dependency(**options)  # type: ignore[arg-type]
    assert calls == 0
    assert checkouts == [], "a connection was taken from the pool"


@pytest.mark.parametrize("attempts", [0, -1, 1.5, True, "3"])
async def test_attempts_must_be_a_whole_number_of_at_least_one(
    manager: DatabaseSessionManager, attempts: object
) -> None:
    """attempts=1 means no retry; anything below or not a whole number is refused."""

    async def work(_: AsyncSession) -> None:
        raise AssertionError("ran")

    with pytest.raises(DatabaseConfigError, match="attempts must be a whole number"):
        await manager.run_in_transaction(work, attempts=attempts)  # type: ignore[arg-type]
    with pytest.raises(DatabaseConfigError, match="attempts must be a whole number"):
        retrying_route_class(attempts=attempts)  # type: ignore[arg-type]


SerializableSessionDep = Annotated[
    AsyncSession, Depends(session_dependency(isolation_level="SERIALIZABLE"), scope="function")
]


def _app(route_class: type[RetryingRoute] = RetryingRoute) -> tuple[FastAPI, list[int]]:
    attempts: list[int] = []
    router = APIRouter(route_class=route_class)

    @router.post("/marks/{note}")
    async def mark(note: str, failing: int, db: AsyncSessionDep) -> dict[str, int]:
        attempts.append(len(attempts) + 1)
        await db.execute(INSERT, {"note": note, "fail": len(attempts) <= failing})
        return {"attempt": len(attempts)}

    @router.get("/isolation")
    async def isolation(db: SerializableSessionDep) -> str:
        level: str = await db.scalar(text("SELECT current_setting('transaction_isolation')"))
        return level

    app = FastAPI()
    app.include_router(router)
    return app, attempts


@pytest.mark.parametrize(
    ("route_class", "failing", "status", "stored"),
    [
        (RetryingRoute, 2, 200, 1),
        (retrying_route_class(attempts=2), 2, 500, 0),
        (retrying_route_class(attempts=1), 1, 500, 0),
    ],
    ids=["third-attempt-commits", "attempts-exhausted", "no-retry"],
)
async def test_a_retrying_route_runs_the_request_again_when_its_commit_conflicts(
    manager: DatabaseSessionManager,
    route_class: type[RetryingRoute],
    failing: int,
    status: int,
    stored: int,
) -> None:
    """One answer per request; each attempt's session is closed before the next starts.

    The pool holds one connection with a 2 s timeout: an attempt whose session
    stayed open would make the next one wait and fail.
    """
    app, attempts = _app(route_class)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/marks/route", params={"failing": failing})

    assert response.status_code == status
    if status == 200:
        assert response.json() == {"attempt": failing + 1}
    assert len(attempts) == min(route_class.attempts, failing + 1)
    assert checked_out(manager) == 0
    assert await _stored(manager, "route") == stored


async def test_session_dependency_gives_the_route_its_isolation_level(
    manager: DatabaseSessionManager,
) -> None:
    """session_dependency(isolation_level=...) is AsyncSessionDep at that level."""
    app, _ = _app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/isolation")
    assert response.json() == "serializable"


async def test_options_are_ignored_inside_a_tests_rollback_isolation(
    db_session: AsyncSession,
) -> None:
    """A joined session cannot change the level mid-transaction: the test's applies, no error."""
    from app.database import session_manager

    async with session_manager.session(isolation_level="SERIALIZABLE") as db:
        level = await db.scalar(text("SELECT current_setting('transaction_isolation')"))
    assert level == "read committed"
