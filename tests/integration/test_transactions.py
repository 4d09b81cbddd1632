"""Per-unit isolation and flags, and RetryingRoute's attempts (issue 11).

The retries of run_in_transaction, and the proofs under real contention (write
skew, transfers, deadlocks), are in test_conflict_retries.py. Here a deferred
constraint trigger fails a chosen attempt's COMMIT with a serialization failure
(40001), the one failure a client cannot see coming.
"""

from __future__ import annotations

import asyncio
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
    CommitOutcomeUnknownError,
    DatabaseConfigError,
    DatabaseSessionManager,
    ReadOnlyTransactionError,
    RetryingRoute,
    _fastapi,
    _retry,
    get_db,
    on_commit,
    retrying_route_class,
    session_dependency,
)
from app.database._classify import sqlstate_of
from app.main import create_app
from tests.integration.forced_conflicts import (
    RAISE_SERIALIZATION_FAILURE,
    drop_fail_commit,
    fail_commit_when,
)
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
    with pytest.raises(ReadOnlyTransactionError) as caught:
        async with manager.session(read_only=True) as db:
            await db.execute(INSERT, {"note": "read-only", "fail": False})
    assert sqlstate_of(caught.value) == "25006"
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

    # Request-scoped: its session ends after the response; a failed attempt's must
    # still end (rolled back) before the next attempt needs the pool's one connection.
    @router.post("/request-scoped/{note}")
    async def request_scoped(
        note: str, db: Annotated[AsyncSession, Depends(get_db)]
    ) -> dict[str, int]:
        attempts.append(len(attempts) + 1)
        await db.execute(INSERT, {"note": note, "fail": False})
        if len(attempts) == 1:
            await db.execute(text(RAISE_SERIALIZATION_FAILURE))
        return {"attempt": len(attempts)}

    @router.post("/committing/{note}")
    async def committing(note: str, db: AsyncSessionDep) -> dict[str, int]:
        attempts.append(len(attempts) + 1)
        await db.execute(INSERT, {"note": note, "fail": False})
        await db.commit()
        return {"attempt": len(attempts)}

    @router.post("/with-callback/{note}")
    async def with_callback(note: str, db: AsyncSessionDep) -> dict[str, int]:
        attempts.append(len(attempts) + 1)
        on_commit(db, lambda: attempts.append(0))  # 0: the callback ran
        await db.execute(INSERT, {"note": note, "fail": len(attempts) == 1})
        return {"attempt": len(attempts)}

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


async def test_the_reference_services_item_routes_are_retried_on_a_conflict(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """POST /items whose first COMMIT fails with 40001 answers 201 once: it ran twice."""
    # nextval() is not rolled back with the failed attempt: only the first one fails.
    await observer.execute(
        """
        CREATE SEQUENCE tx_item_attempts;
        CREATE FUNCTION tx_item_conflict() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.name = 'retried-item' AND nextval('tx_item_attempts') = 1 THEN
                RAISE EXCEPTION 'forced conflict at COMMIT' USING ERRCODE = 'serialization_failure';
            END IF;
            RETURN NULL;
        END$$;
        CREATE CONSTRAINT TRIGGER tx_item_conflict AFTER INSERT ON items
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION tx_item_conflict();
        """
    )
    try:
        # committed_db: the service's own session_manager, committing for real.
        transport = httpx.ASGITransport(app=create_app())  # its lifespan is not run
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/items", json={"name": "retried-item"})
        attempts = await observer.fetchval("SELECT last_value FROM tx_item_attempts")
    finally:
        await observer.execute(
            "DROP FUNCTION tx_item_conflict() CASCADE; DROP SEQUENCE tx_item_attempts"
        )

    assert response.status_code == 201, response.text
    assert attempts == 2


async def test_a_request_scoped_session_of_a_failed_attempt_ends_before_the_retry(
    manager: DatabaseSessionManager,
) -> None:
    """Plain Depends(get_db) under RetryingRoute: the failed attempt's connection comes back.

    One pooled connection: had the first attempt's session stayed open until the
    response, the second would wait for it and fail.
    """
    app, attempts = _app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/request-scoped/request-scoped")

    assert response.status_code == 200, response.text
    assert attempts == [1, 2]
    assert checked_out(manager) == 0
    assert await _stored(manager, "request-scoped") == 1  # the retry's row only


async def test_an_explicit_commit_in_a_retried_unit_is_refused(
    manager: DatabaseSessionManager,
) -> None:
    """A retry would apply what it committed twice: refused, naming the fix, nothing stored."""
    calls = 0

    async def work(db: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await db.execute(INSERT, {"note": "committed-early", "fail": False})
        await db.commit()

    with pytest.raises(RuntimeError, match=r"let the unit of work commit at its end"):
        await manager.run_in_transaction(work)
    app, attempts = _app()
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/committing/committed-early")

    assert calls == 1
    assert response.status_code == 500
    assert attempts == [1]
    assert await _stored(manager, "committed-early") == 0
    async with manager.session() as db:  # outside a retried unit, commit() is the user's
        await db.execute(INSERT, {"note": "committed-early", "fail": False})
        await db.commit()
    assert await _stored(manager, "committed-early") == 1


async def test_a_retried_routes_on_commit_callback_runs_once(
    manager: DatabaseSessionManager,
) -> None:
    """The first attempt fails at COMMIT: its callback is dropped, the second's runs."""
    app, attempts = _app()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/with-callback/callback")

    assert response.status_code == 200, response.text
    assert attempts == [1, 2, 0]  # two attempts, then one callback


async def test_a_units_options_hold_after_an_explicit_commit(
    manager: DatabaseSessionManager,
) -> None:
    """Every transaction of the unit is read-only, not just the first."""
    probe = text("SELECT current_setting('transaction_read_only')")
    with pytest.raises(ReadOnlyTransactionError) as refused:
        async with manager.session(read_only=True) as db:
            assert await db.scalar(probe) == "on"
            await db.commit()
            assert await db.scalar(probe) == "on"
            await db.execute(INSERT, {"note": "after-commit", "fail": False})
    assert sqlstate_of(refused.value) == "25006"
    assert await _stored(manager, "after-commit") == 0


async def test_attempts_are_spaced_by_the_backoff(
    manager: DatabaseSessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait between attempts is retry_delay()'s: here made 0.2 s, never shorter."""
    monkeypatch.setattr(_retry, "retry_delay", lambda attempt: 0.2)
    starts: list[float] = []

    async def work(db: AsyncSession) -> None:
        starts.append(asyncio.get_running_loop().time())
        if len(starts) == 1:
            await db.execute(text(RAISE_SERIALIZATION_FAILURE))

    await manager.run_in_transaction(work)

    assert len(starts) == 2
    assert starts[1] - starts[0] >= 0.2


@pytest.mark.parametrize("attempt", [1, 2, 5, 10])
def test_the_backoff_is_jittered_and_capped(attempt: int) -> None:
    """Full jitter: uniform in [0, min(0.5 s, 10 ms x 2^(attempt-1))], not one fixed wait."""
    bound = min(_retry.RETRY_MAX_SECONDS, _retry.RETRY_BASE_SECONDS * 2 ** (attempt - 1))
    delays = [_retry.retry_delay(attempt) for _ in range(200)]
    assert all(0 <= delay <= bound for delay in delays)
    assert len(set(delays)) > 100


@pytest.mark.parametrize(
    ("condition", "unknown"),
    [("admin_shutdown", True), ("crash_shutdown", True), ("serialization_failure", False)],
)
async def test_a_commit_ended_by_a_server_shutdown_has_an_unknown_outcome(
    manager: DatabaseSessionManager, observer: asyncpg.Connection, condition: str, unknown: bool
) -> None:
    """57P01/57P02 at COMMIT: the server may have written the commit first; 40001 it did not."""
    await observer.execute("CREATE TABLE tx_shutdown (fail boolean NOT NULL)")
    await fail_commit_when(observer, "tx_shutdown", "fail", condition)
    try:
        with pytest.raises(DBAPIError if not unknown else CommitOutcomeUnknownError):
            async with manager.session() as db:
                await db.execute(text("INSERT INTO tx_shutdown VALUES (true)"))
    finally:
        await drop_fail_commit(observer, "tx_shutdown")
        await observer.execute("DROP TABLE tx_shutdown")


async def test_read_only_holds_inside_a_tests_rollback_isolation(db_session: AsyncSession) -> None:
    """A write in a read-only unit fails under the test plugin too; the test's own work goes on."""
    from app.database import session_manager

    with pytest.raises(ReadOnlyTransactionError) as refused:
        async with session_manager.session(read_only=True) as db:
            await db.execute(text("INSERT INTO items (name) VALUES ('read-only-in-a-test')"))
    assert sqlstate_of(refused.value) == "25006"
    assert await db_session.scalar(text("SHOW transaction_read_only")) == "off"
    async with session_manager.session(read_only=True) as db:  # released, not rolled back
        assert await db.scalar(text("SHOW transaction_read_only")) == "on"
    assert await db_session.scalar(text("SHOW transaction_read_only")) == "off"
