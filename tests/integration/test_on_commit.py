"""`on_commit`: callbacks run once per real COMMIT, never for work that rolled back.

Most tests commit for real, on a private manager and tables of their own
(`oc_units`, `oc_ledger`) created and dropped around each test; the capture
tests run under the rollback isolation, where no COMMIT ever happens.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI, HTTPException
from sqlalchemy import select, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from app.database import (
    AsyncSessionDep,
    DatabaseErrorKind,
    DatabaseSessionManager,
    classify_error,
    on_commit,
    session_manager,
)
from app.database.testing import _on_commit as testing_on_commit
from app.models import Item
from tests.integration.forced_conflicts import (
    RAISE_SERIALIZATION_FAILURE,
    drop_fail_commit,
    fail_commit_when,
)
from tests.postgres import checked_out

OnCommitCallback = Callable[[], object]
CaptureCallbacks = Callable[..., AbstractAsyncContextManager[list[OnCommitCallback]]]

WORKERS = 4
UNITS = 1000

SCHEMA = """
CREATE TABLE oc_units (id int PRIMARY KEY);
CREATE TABLE oc_ledger (unit_id int NOT NULL, tag text NOT NULL);
-- An orphan (unit 0: none has that id) fails only at COMMIT: its foreign key is deferred.
CREATE TABLE oc_orphans (
    id int PRIMARY KEY,
    unit_id int NOT NULL REFERENCES oc_units (id) DEFERRABLE INITIALLY DEFERRED
);
-- A row with fail set makes COMMIT itself fail with a serialization failure.
CREATE TABLE oc_fail_at_commit (unit_id int NOT NULL, fail boolean NOT NULL);
"""
DROP = "DROP TABLE IF EXISTS oc_orphans, oc_units, oc_ledger, oc_fail_at_commit"
SERIALIZATION_FAILURE = text(RAISE_SERIALIZATION_FAILURE)
INFO_PREFIX = "app.database.on_commit"


@pytest.fixture(name="tables")
async def tables_fixture(observer: asyncpg.Connection) -> AsyncIterator[None]:
    await drop_fail_commit(observer, "oc_fail_at_commit")
    await observer.execute(f"{DROP}; {SCHEMA}")
    await fail_commit_when(observer, "oc_fail_at_commit", "fail")
    yield
    await drop_fail_commit(observer, "oc_fail_at_commit")
    await observer.execute(DROP)


@pytest.fixture(name="manager")
async def manager_fixture(database_url: URL, tables: None) -> AsyncIterator[DatabaseSessionManager]:
    """A private manager that commits for real; its pool is exactly one connection per worker."""
    manager = DatabaseSessionManager()
    # No overflow: a callback that opens a unit of work of its own gets a connection
    # only if the committed unit gave its back before the callbacks ran.
    manager.init(url=database_url, pool_size=WORKERS, max_overflow=0)
    yield manager
    await manager.close()


async def _insert_unit(session: AsyncSession, unit_id: int) -> None:
    await session.execute(text("INSERT INTO oc_units VALUES (:id)"), {"id": unit_id})


async def _units(observer: asyncpg.Connection) -> set[int]:
    return {row["id"] for row in await observer.fetch("SELECT id FROM oc_units")}


def _leftovers(session: AsyncSession | Session) -> list[str]:
    return [key for key in session.info if str(key).startswith(INFO_PREFIX)]


async def test_callbacks_run_after_commit_in_registration_order(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """Sync and async callbacks run once, in order, after COMMIT, before session() exits."""
    calls: list[str] = []

    async def async_callback() -> None:
        # The unit's row is committed: another connection sees it.
        count = await observer.fetchval("SELECT count(*) FROM oc_units WHERE id = 1")
        calls.append(f"async saw {count}")

    async with manager.session() as session:
        await _insert_unit(session, 1)
        on_commit(session, lambda: calls.append("first"))
        on_commit(session, async_callback)
        on_commit(session.sync_session, lambda: calls.append("third"))
        await session.flush()
        assert calls == [], "a callback ran before COMMIT"

    assert calls == ["first", "async saw 1", "third"]


async def test_callbacks_never_run_when_the_unit_rolls_back(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """An exception, an explicit rollback() and closing without commit all drop them."""
    calls: list[str] = []

    with pytest.raises(LookupError):
        async with manager.session() as session:
            await _insert_unit(session, 1)
            on_commit(session, lambda: calls.append("raised"))
            raise LookupError("the unit fails")

    async with manager.session() as session:
        await _insert_unit(session, 2)
        on_commit(session, lambda: calls.append("rolled back"))
        await session.rollback()
    # (session() committed an empty transaction after the rollback.)

    async with manager.engine.connect() as connection, AsyncSession(bind=connection) as plain:
        # Not the package's session class: refused rather than silently never run.
        with pytest.raises(TypeError, match=r"session of app\.database"):
            on_commit(plain, lambda: None)

    assert calls == []
    assert await _units(observer) == set()


async def test_a_commit_that_fails_runs_no_callback(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """COMMIT itself failing (a deferred foreign key) counts as a rollback."""
    calls: list[str] = []

    with pytest.raises(IntegrityError):
        async with manager.session() as session:
            await session.execute(text("INSERT INTO oc_orphans VALUES (1, 0)"))
            on_commit(session, lambda: calls.append("orphan"))

    assert calls == []


async def test_savepoint_rollback_drops_its_callbacks_and_release_keeps_them(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """Only the callbacks of savepoints that were rolled back (directly or by an outer one) go."""
    calls: list[str] = []

    async with manager.session() as session:
        on_commit(session, lambda: calls.append("outer"))
        async with session.begin_nested():
            on_commit(session, lambda: calls.append("released"))
        with pytest.raises(LookupError):
            async with session.begin_nested():
                on_commit(session, lambda: calls.append("rolled back"))
                raise LookupError
        with pytest.raises(LookupError):
            async with session.begin_nested():
                async with session.begin_nested():
                    # Released, but inside a savepoint that then rolls back.
                    on_commit(session, lambda: calls.append("inner of rolled back"))
                on_commit(session, lambda: calls.append("outer of rolled back"))
                raise LookupError
        # A failed flush rolls its savepoint back too.
        await _insert_unit(session, 1)
        await session.flush()
        with pytest.raises(IntegrityError):
            async with session.begin_nested():
                on_commit(session, lambda: calls.append("failed flush"))
                await _insert_unit(session, 1)
        on_commit(session, lambda: calls.append("last"))
        assert calls == []

    assert calls == ["outer", "released", "last"]
    assert await _units(observer) == {1}


async def test_explicit_commit_mid_unit_runs_the_callbacks_registered_before_it(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """`await session.commit()` is an outermost COMMIT; what follows is a new unit."""
    calls: list[str] = []

    with pytest.raises(LookupError):
        async with manager.session() as session:
            await _insert_unit(session, 1)
            on_commit(session, lambda: calls.append("before commit"))
            await session.commit()
            assert calls == ["before commit"]
            await _insert_unit(session, 2)
            on_commit(session, lambda: calls.append("after commit"))
            raise LookupError("the second part fails")

    assert calls == ["before commit"]
    assert await _units(observer) == {1}


async def test_a_failing_callback_is_logged_and_the_others_still_run(
    manager: DatabaseSessionManager,
    observer: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing is raised, the data stays committed, the log names the callback."""
    calls: list[str] = []

    def send_welcome_email() -> None:
        raise ConnectionError("mail server down")

    async def publish_event() -> None:
        raise ValueError("broker refused")

    caplog.set_level(logging.ERROR, logger="app.database")
    async with manager.session() as session:
        await _insert_unit(session, 1)
        on_commit(session, send_welcome_email)
        on_commit(session, lambda: calls.append("second"))
        on_commit(session, publish_event)
        on_commit(session, lambda: calls.append("fourth"))

    assert calls == ["second", "fourth"]
    assert await _units(observer) == {1}
    failures = [r for r in caplog.records if r.name == "app.database"]
    assert [r.levelno for r in failures] == [logging.ERROR, logging.ERROR]
    first, second = (r.getMessage() for r in failures)
    assert "send_welcome_email" in first
    assert "IS committed" in first
    assert "publish_event" in second
    assert failures[0].exc_info is not None
    assert isinstance(failures[0].exc_info[1], ConnectionError)


async def test_cancellation_in_a_callback_is_not_swallowed(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """A BaseException (cancellation, KeyboardInterrupt) propagates; the data is committed."""

    class Stop(BaseException):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        async with manager.session() as session:
            await _insert_unit(session, 1)
            on_commit(session, stop)

    assert await _units(observer) == {1}
    assert checked_out(manager) == 0


async def test_nothing_is_kept_after_the_session_closes(
    database_url: URL, tables: None, observer: asyncpg.Connection
) -> None:
    """session.info is clean after commit, rollback and close; nothing reaches the next unit."""
    manager = DatabaseSessionManager()
    manager.init(url=database_url, pool_size=1, max_overflow=0)  # one pooled connection
    calls: list[str] = []
    try:
        async with manager.session() as committed:
            on_commit(committed, lambda: calls.append("committed"))
        assert _leftovers(committed) == []
        assert _leftovers(committed.sync_session) == []

        with pytest.raises(LookupError):
            async with manager.session() as rolled_back:
                async with rolled_back.begin_nested():
                    on_commit(rolled_back, lambda: calls.append("rolled back"))
                raise LookupError
        assert _leftovers(rolled_back.sync_session) == []

        async with manager.session() as closed:
            await _insert_unit(closed, 1)
            on_commit(closed, lambda: calls.append("closed"))
            assert _leftovers(closed.sync_session) != []
            await closed.close()  # rolls back; session() then commits an empty transaction
            assert _leftovers(closed.sync_session) == []

        # The next unit, on the same pooled connection, runs only its own callback.
        async with manager.session() as next_unit:
            on_commit(next_unit, lambda: calls.append("next"))
    finally:
        await manager.close()

    assert calls == ["committed", "next"]


def _recording(app: FastAPI, events: list[str]) -> Callable[..., Awaitable[None]]:
    """The ASGI app, noting when the response starts in `events`."""

    async def asgi(scope: Any, receive: Any, send: Callable[[Any], Awaitable[None]]) -> None:
        async def send_noted(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                events.append("response sent")
            await send(message)

        await app(scope, receive, send_noted)

    return asgi


def _on_commit_app(observer: asyncpg.Connection, events: list[str]) -> FastAPI:
    app = FastAPI()

    async def committed_count(unit_id: int) -> int:
        count: int = await observer.fetchval("SELECT count(*) FROM oc_units WHERE id = $1", unit_id)
        return count

    @app.post("/units/{unit_id}", status_code=201)
    async def create_unit(db: AsyncSessionDep, unit_id: int) -> dict[str, int]:
        await _insert_unit(db, unit_id)

        async def note_commit() -> None:
            events.append(f"callback: {await committed_count(unit_id)} row committed")

        on_commit(db, note_commit)
        events.append("route returned")
        return {"id": unit_id}

    @app.post("/refused/{unit_id}")
    async def refuse(db: AsyncSessionDep, unit_id: int) -> None:
        await _insert_unit(db, unit_id)
        on_commit(db, lambda: events.append("callback of a refused request"))
        raise HTTPException(409, "refused after writing")

    @app.post("/emails/{unit_id}", status_code=201)
    async def create_and_email(
        db: AsyncSessionDep, background_tasks: BackgroundTasks, unit_id: int
    ) -> dict[str, int]:
        await _insert_unit(db, unit_id)

        async def send_email(to: str) -> None:
            events.append(f"email to {to}: {await committed_count(unit_id)} row committed")

        on_commit(db, lambda: background_tasks.add_task(send_email, f"user{unit_id}"))
        events.append("route returned")
        return {"id": unit_id}

    return app


@pytest.fixture(name="asgi_events")
def asgi_events_fixture(committed_db: DatabaseSessionManager, tables: None) -> list[str]:
    """What happened during a request, in order; `session_manager` commits for real."""
    return []


async def _post(app: FastAPI, events: list[str], path: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=_recording(app, events))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post(path)


async def test_with_async_session_dep_callbacks_run_after_commit_before_the_response(
    asgi_events: list[str], observer: asyncpg.Connection
) -> None:
    """Route returns, COMMIT, callback (sees the row committed), then the response starts."""
    app = _on_commit_app(observer, asgi_events)

    response = await _post(app, asgi_events, "/units/1")

    assert response.status_code == 201
    assert asgi_events == ["route returned", "callback: 1 row committed", "response sent"]


async def test_with_async_session_dep_a_refused_request_runs_no_callback(
    asgi_events: list[str], observer: asyncpg.Connection
) -> None:
    """A route that raises rolls back: its callbacks are dropped and nothing is written."""
    app = _on_commit_app(observer, asgi_events)

    response = await _post(app, asgi_events, "/refused/1")

    assert response.status_code == 409
    assert asgi_events == ["response sent"]
    assert await _units(observer) == set()


async def test_background_tasks_defer_a_callback_past_the_response(
    asgi_events: list[str], observer: asyncpg.Connection
) -> None:
    """A callback that adds a BackgroundTasks task: the email goes after the response."""
    app = _on_commit_app(observer, asgi_events)

    response = await _post(app, asgi_events, "/emails/1")

    assert response.status_code == 201
    assert asgi_events == ["route returned", "response sent", "email to user1: 1 row committed"]


# Under the rollback isolation: every session joins the test's outer transaction.


async def _create_item(name: str, calls: list[str], *, fail: bool = False) -> None:
    """Code under test: a unit of work of the app's own, with a side effect on commit."""
    async with session_manager.session() as db:
        db.add(Item(name=name))
        on_commit(db, lambda: calls.append(name))
        if fail:
            raise LookupError(name)


async def test_under_isolation_callbacks_do_not_run(db_connection: Any) -> None:
    """The session's commit only releases a savepoint: no real COMMIT, no callback."""
    calls: list[str] = []

    await _create_item("isolated", calls)

    assert calls == []


async def test_capture_shows_the_committed_units_callbacks_without_running_them(
    capture_on_commit_callbacks: CaptureCallbacks, db_session: AsyncSession
) -> None:
    """The fixture yields the callbacks of sessions that committed, in order; none ran."""
    calls: list[str] = []

    async with capture_on_commit_callbacks() as callbacks:
        await _create_item("first", calls)
        with pytest.raises(LookupError):
            await _create_item("rolled back", calls, fail=True)
        on_commit(db_session, lambda: calls.append("test's own session"))
        await db_session.commit()
        await _create_item("second", calls)

    assert calls == []
    assert len(callbacks) == 3
    for callback in callbacks:
        callback()
    assert calls == ["first", "test's own session", "second"]
    names = await db_session.scalars(select(Item.name).order_by(Item.id))
    assert list(names) == ["first", "second"]


async def test_capture_with_execute_runs_them_and_those_they_register(
    db_connection: Any,
) -> None:
    """execute=True runs each callback at the end, async ones awaited, chained ones too."""
    calls: list[str] = []

    async def create_follow_up() -> None:
        await _create_item("follow-up", calls)  # registers a callback of its own

    async with testing_on_commit.capture_on_commit_callbacks(
        db_connection, execute=True
    ) as callbacks:
        await _create_item("first", calls)
        async with session_manager.session() as db:
            on_commit(db, create_follow_up)
        assert calls == []

    assert calls == ["first", "follow-up"]
    assert len(callbacks) == 3


async def test_capture_with_execute_runs_nothing_when_the_block_raises(
    capture_on_commit_callbacks: CaptureCallbacks,
) -> None:
    """The test failed: its callbacks are not run on top of that."""
    calls: list[str] = []

    with pytest.raises(LookupError):
        async with capture_on_commit_callbacks(execute=True) as callbacks:
            await _create_item("first", calls)
            raise LookupError

    assert calls == []
    assert len(callbacks) == 1


# The ledger proof: 1,000 units, each with a random fate, on WORKERS connections.

OUTCOMES = (
    "commit",
    "rollback",
    "savepoint rolled back",
    "savepoint released",
    "commit fails",
    "retried",
    "retried at commit",
    "retries exhausted",
)


async def test_callbacks_run_exactly_once_per_committed_unit(
    manager: DatabaseSessionManager, observer: asyncpg.Connection
) -> None:
    """Each callback writes a ledger row in a unit of its own: one per committed unit, 0 else."""
    if not hasattr(manager, "run_in_transaction"):
        pytest.skip("DatabaseSessionManager.run_in_transaction is missing (issue 11, part 2)")
    seed = int(os.environ.get("ON_COMMIT_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    fates = {unit_id: rng.choice(OUTCOMES) for unit_id in range(1, UNITS + 1)}
    effects: Counter[tuple[int, str]] = Counter()
    attempts: Counter[int] = Counter()
    errors: dict[int, Exception] = {}

    def record(unit_id: int, tag: str) -> Callable[[], Awaitable[None]]:
        async def write_ledger() -> None:
            async with manager.session() as ledger:
                await ledger.execute(
                    text("INSERT INTO oc_ledger VALUES (:unit_id, :tag)"),
                    {"unit_id": unit_id, "tag": tag},
                )
            effects[unit_id, tag] += 1

        return write_ledger

    async def retried_work(session: AsyncSession, unit_id: int, *, at_commit: bool) -> None:
        attempts[unit_id] += 1
        await _insert_unit(session, unit_id)
        on_commit(session, record(unit_id, "unit"))
        if at_commit:
            await session.execute(
                text("INSERT INTO oc_fail_at_commit VALUES (:u, :fail)"),
                {"u": unit_id, "fail": attempts[unit_id] == 1},
            )
        elif attempts[unit_id] == 1 or fates[unit_id] == "retries exhausted":
            await session.execute(SERIALIZATION_FAILURE)

    async def run_unit(unit_id: int) -> None:
        fate = fates[unit_id]
        if fate.startswith("retr"):
            try:
                await manager.run_in_transaction(
                    lambda s: retried_work(s, unit_id, at_commit=fate == "retried at commit"),
                    attempts=2,
                )
            except Exception as error:
                errors[unit_id] = error
            return
        try:
            async with manager.session() as session:
                await _insert_unit(session, unit_id)
                on_commit(session, record(unit_id, "unit"))
                if fate == "rollback":
                    raise LookupError(unit_id)
                if fate == "commit fails":
                    await session.execute(
                        text("INSERT INTO oc_orphans VALUES (:id, 0)"), {"id": unit_id}
                    )
                if fate.startswith("savepoint"):
                    try:
                        async with session.begin_nested():
                            await _insert_unit(session, -unit_id)
                            on_commit(session, record(unit_id, "savepoint"))
                            if fate == "savepoint rolled back":
                                raise LookupError(unit_id)
                    except LookupError:
                        pass
        except (LookupError, IntegrityError) as error:
            errors[unit_id] = error

    queue: asyncio.Queue[int] = asyncio.Queue()
    for unit_id in fates:
        queue.put_nowait(unit_id)

    async def worker() -> None:
        while not queue.empty():
            await run_unit(queue.get_nowait())

    await asyncio.gather(*(worker() for _ in range(WORKERS)))

    failed = {"rollback", "commit fails", "retries exhausted"}

    committed = set(OUTCOMES) - failed
    expected: Counter[tuple[int, str]] = Counter()
    expected_units: set[int] = set()
    for unit_id, fate in fates.items():
        if fate in committed:
            expected[unit_id, "unit"] = 1
            expected_units.add(unit_id)
        if fate == "savepoint released":
            expected[unit_id, "savepoint"] = 1
            expected_units.add(-unit_id)
    ledger = Counter(
        (row["unit_id"], row["tag"])
        for row in await observer.fetch("SELECT unit_id, tag FROM oc_ledger")
    )
    unexpected = {
        u: (fate, repr(errors.get(u)))
        for u, fate in fates.items()
        if (fate in failed) != (u in errors)
    }
    assert not unexpected, f"seed {seed}"
    assert all(
        classify_error(errors[u]) is DatabaseErrorKind.RETRYABLE
        for u, fate in fates.items()
        if fate == "retries exhausted"
    ), f"seed {seed}"
    assert effects == expected, f"seed {seed}"
    assert ledger == expected, f"seed {seed}"
    assert await _units(observer) == expected_units, f"seed {seed}"
    # Every kind of fate happened, and the retried units did run twice.
    assert set(fates.values()) == set(OUTCOMES), f"seed {seed}"
    assert all(
        attempts[unit_id] == 2 for unit_id, fate in fates.items() if fate.startswith("retr")
    ), f"seed {seed}"


async def test_the_toolkits_capture_runs_nothing_unless_asked(db_connection: Any) -> None:
    """capture_on_commit_callbacks(connection) without execute= only collects the callbacks."""
    calls: list[str] = []

    async with testing_on_commit.capture_on_commit_callbacks(db_connection) as callbacks:
        await _create_item("first", calls)

    assert calls == []
    assert len(callbacks) == 1
