"""Conflicts retried on real PostgreSQL (issue 11, part 3).

- Write skew under SERIALIZABLE (on-call doctors: at least one stays on call) and
  lost updates under REPEATABLE READ (transfers: the sum of balances is constant),
  by WORKERS concurrent workers of ROUNDS units each: with `run_in_transaction`
  every unit is answered and the data matches the answers; run once (attempts=1,
  or a plain `session()`) the same load gets 40001 errors, and the data still
  matches the answers of the units that did commit.
- The same units, two at a time with a rendezvous at the point of conflict, so
  that the conflict is certain: retried, or raised once; and at READ COMMITTED
  the promise broken, which shows the check can catch it.
- A forced deadlock (40P01): two units locking two rows in opposite orders.
- The retry budget: a conflict on every attempt is raised after the last, raised
  by a statement or by COMMIT; a unique violation is never retried.
- `RetryingRoute` with a SERIALIZABLE session dependency, over ASGI and over a real
  uvicorn: one 200 per request, each response the counter value it committed;
  with attempts=1, the reference error handlers' 503 + Retry-After for some.

The figures (units, calls to the work function, retries, units by calls) are
printed: run with `-s` to see them. The test tier runs 20 workers x 10 units
(CONFLICT_ROUNDS, default 10); `CONFLICT_ROUNDS=50` runs the issue's 20 x 50
(about 20 s per driver on 2 cores, against 2 to 3 s).
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import asyncpg
import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import (
    DatabaseErrorKind,
    DatabaseSessionManager,
    RetryingRoute,
    _fastapi,
    classify_error,
    retrying_route_class,
    session_dependency,
)
from app.database._classify import sqlstate_of
from app.errors import install_error_handlers
from tests.drivers import application_name
from tests.integration.forced_conflicts import (
    RAISE_SERIALIZATION_FAILURE,
    drop_fail_commit,
    fail_commit_when,
)
from tests.integration.live_server import serve
from tests.postgres import checked_out

WORKERS = 20
ROUNDS = int(os.environ.get("CONFLICT_ROUNDS", "10"))
# Enough that no unit of the stress runs exhausts it: the most any unit needed is printed.
STRESS_ATTEMPTS = 30
# The deadlock's victim is found after deadlock_timeout (1 s by default): shorter here.
DEADLOCK_TIMEOUT = "100ms"
RENDEZVOUS_SECONDS = 10.0

SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"

Work = Callable[[AsyncSession], Awaitable[Any]]
Pause = Callable[[], Awaitable[None]]


def unique_table(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(3)}"


# --- how a unit of work is run --------------------------------------------------------


Runner = Callable[[DatabaseSessionManager, Work, str], Awaitable[Any]]


async def run_retried(manager: DatabaseSessionManager, work: Work, level: str) -> Any:
    return await manager.run_in_transaction(work, attempts=STRESS_ATTEMPTS, isolation_level=level)


async def run_once(manager: DatabaseSessionManager, work: Work, level: str) -> Any:
    return await manager.run_in_transaction(work, attempts=1, isolation_level=level)


async def run_in_plain_session(manager: DatabaseSessionManager, work: Work, level: str) -> Any:
    async with manager.session(isolation_level=level) as session:
        return await work(session)


RUNNERS: dict[str, Runner] = {
    "run_in_transaction": run_retried,
    "attempts=1": run_once,
    "plain-session": run_in_plain_session,
}
RETRIED = "run_in_transaction"


@dataclass
class Outcome:
    """What a batch of units of work did: their answers, their errors, their attempts."""

    answers: list[Any] = field(default_factory=list)
    failures: list[BaseException] = field(default_factory=list)
    calls_per_unit: list[int] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return sum(self.calls_per_unit)

    @property
    def retries(self) -> int:
        return self.calls - len(self.calls_per_unit)

    def failure_states(self) -> Counter[str | None]:
        return Counter(sqlstate_of(failure) for failure in self.failures)

    def unexpected_failures(self) -> list[BaseException]:
        """Failures that are not a conflict PostgreSQL asks to retry."""
        return [
            failure
            for failure in self.failures
            if classify_error(failure) is not DatabaseErrorKind.RETRYABLE
        ]

    def summary(self) -> str:
        most = max(self.calls_per_unit, default=0)
        return (
            f"{len(self.calls_per_unit)} units, {len(self.answers)} answered, "
            f"{len(self.failures)} failed {dict(self.failure_states())}; "
            f"{self.calls} calls to the work ({self.retries} retries), "
            f"at most {most} calls for one unit; units by calls "
            f"{dict(sorted(Counter(self.calls_per_unit).items()))}"
        )


async def run_unit(
    manager: DatabaseSessionManager, runner: Runner, level: str, work: Work, outcome: Outcome
) -> None:
    """Run one unit through `runner`, counting the calls to `work`; record its answer or error."""
    calls = 0

    async def counted(session: AsyncSession) -> Any:
        nonlocal calls
        calls += 1
        return await work(session)

    try:
        outcome.answers.append(await runner(manager, counted, level))
    except Exception as error:  # every failure is examined by the test
        outcome.failures.append(error)
    finally:
        outcome.calls_per_unit.append(calls)


# --- the scenarios ------------------------------------------------------------------


class Scenario(Protocol):
    """Units of work whose concurrent runs conflict, and the promise their data keeps."""

    name: str
    level: str
    """The isolation level that keeps the promise (with retries)."""
    weak_level: str | None
    """A level at which the pair run breaks the promise, if there is one."""
    conflict: str
    """The SQLSTATE the pair run raises at `level`."""

    def setup(self, size: int) -> str:
        """DDL and rows for a run of `size` units in all."""
        ...

    def teardown(self) -> str: ...

    def unit(self, rng: random.Random, pause: Pause | None = None, pick: int = 0) -> Work:
        """One unit of work; `pause` is awaited at the point of conflict; `pick` for pairs."""
        ...

    async def broken_promises(self, observer: asyncpg.Connection, answers: list[Any]) -> list[str]:
        """What the committed data breaks, given the units' answers; empty when all hold."""
        ...


class Doctors:
    """Write skew: a doctor goes off call if at least one other stays on call.

    Each unit reads the doctors on call, then takes one of them off call if
    another remains: two such units that read the same two doctors and each take
    a different one off leave nobody on call, unless SERIALIZABLE stops one.
    Answers: the doctor taken off call, or None when refused.
    """

    name = "doctors"
    level = "SERIALIZABLE"
    weak_level: str | None = "READ COMMITTED"
    conflict = SERIALIZATION_FAILURE

    def __init__(self) -> None:
        self.table = unique_table("retry_doctors")
        self.doctors = 0

    def setup(self, size: int) -> str:
        # Half as many doctors as units: the supply runs out mid-run, so the run
        # crosses the boundary where the invariant is at stake under full load.
        self.doctors = max(2, size // 2)
        return (
            f"CREATE TABLE {self.table} (id int PRIMARY KEY, on_call bool NOT NULL);"
            f"INSERT INTO {self.table} SELECT id, true FROM generate_series(1, {self.doctors}) id;"
        )

    def teardown(self) -> str:
        return f"DROP TABLE IF EXISTS {self.table}"

    def unit(self, rng: random.Random, pause: Pause | None = None, pick: int = 0) -> Work:
        async def go_off_call(session: AsyncSession) -> int | None:
            on_call: list[int] = list(
                (
                    await session.execute(
                        text(f"SELECT id FROM {self.table} WHERE on_call ORDER BY id")
                    )
                ).scalars()
            )
            if pause is not None:
                await pause()
            if len(on_call) < 2:
                return None
            doctor = on_call[pick] if pause is not None else rng.choice(on_call)
            await session.execute(
                text(f"UPDATE {self.table} SET on_call = false WHERE id = :id"), {"id": doctor}
            )
            return doctor

        return go_off_call

    async def broken_promises(self, observer: asyncpg.Connection, answers: list[Any]) -> list[str]:
        off = {
            row["id"]
            for row in await observer.fetch(f"SELECT id FROM {self.table} WHERE NOT on_call")
        }
        taken = [doctor for doctor in answers if doctor is not None]
        broken = []
        if len(off) >= self.doctors:
            broken.append(f"nobody on call: all {self.doctors} doctors are off call")
        if sorted(taken) != sorted(off):
            broken.append(
                f"the answers took {sorted(taken)} off call, the data has {sorted(off)} off call"
            )
        return broken


class Transfers:
    """Lost updates: a transfer reads two balances, then writes both computed values.

    Under REPEATABLE READ an UPDATE of a row another transaction changed since
    the snapshot fails (40001); under READ COMMITTED it overwrites that change.
    Answers: (source, target, amount), or None when the source's balance is short.
    """

    name = "transfers"
    level = "REPEATABLE READ"
    weak_level: str | None = "READ COMMITTED"
    conflict = SERIALIZATION_FAILURE
    accounts = 6
    opening_balance = 1_000

    def __init__(self) -> None:
        self.table = unique_table("retry_accounts")

    def setup(self, size: int) -> str:
        return (
            f"CREATE TABLE {self.table} (id int PRIMARY KEY, balance bigint NOT NULL);"
            f"INSERT INTO {self.table}"
            f" SELECT id, {self.opening_balance} FROM generate_series(1, {self.accounts}) id;"
        )

    def teardown(self) -> str:
        return f"DROP TABLE IF EXISTS {self.table}"

    def unit(self, rng: random.Random, pause: Pause | None = None, pick: int = 0) -> Work:
        if pause is None:
            source, target = rng.sample(range(1, self.accounts + 1), 2)
            amount = rng.randint(1, 300)
        else:  # the pair: both pay from account 1, into 2 and 3
            source, target, amount = 1, 2 + pick, 10 * (pick + 1)

        async def transfer(session: AsyncSession) -> tuple[int, int, int] | None:
            rows = await session.execute(
                text(f"SELECT id, balance FROM {self.table} WHERE id IN (:source, :target)"),
                {"source": source, "target": target},
            )
            balances: dict[int, int] = {row.id: row.balance for row in rows}
            if pause is not None:
                await pause()
            if balances[source] < amount:
                return None
            changed = {source: balances[source] - amount, target: balances[target] + amount}
            # In id order: units locking the same two rows in opposite orders would
            # deadlock, found only after deadlock_timeout; this scenario is about 40001.
            for account, balance in sorted(changed.items()):
                await session.execute(
                    text(f"UPDATE {self.table} SET balance = :balance WHERE id = :id"),
                    {"id": account, "balance": balance},
                )
            return source, target, amount

        return transfer

    async def broken_promises(self, observer: asyncpg.Connection, answers: list[Any]) -> list[str]:
        balances = {
            row["id"]: row["balance"]
            for row in await observer.fetch(f"SELECT id, balance FROM {self.table}")
        }
        expected = dict.fromkeys(balances, self.opening_balance)
        for answer in answers:
            if answer is not None:
                source, target, amount = answer
                expected[source] -= amount
                expected[target] += amount
        broken = []
        total = sum(balances.values())
        if total != self.opening_balance * self.accounts:
            broken.append(
                f"the sum of balances is {total}, not {self.opening_balance * self.accounts}"
            )
        if balances != expected:
            broken.append(f"balances {balances}, but the answers add up to {expected}")
        return broken


class Deadlock:
    """Two units lock rows 1 and 2 in opposite orders, then count themselves on both.

    Answers: the order the unit locked in; each committed unit adds 1 to both rows.
    """

    name = "deadlock"
    level = "READ COMMITTED"
    weak_level: str | None = None
    conflict = DEADLOCK_DETECTED

    def __init__(self) -> None:
        self.table = unique_table("retry_locks")

    def setup(self, size: int) -> str:
        return (
            f"CREATE TABLE {self.table} (id int PRIMARY KEY, units int NOT NULL);"
            f"INSERT INTO {self.table} VALUES (1, 0), (2, 0);"
        )

    def teardown(self) -> str:
        return f"DROP TABLE IF EXISTS {self.table}"

    def unit(self, rng: random.Random, pause: Pause | None = None, pick: int = 0) -> Work:
        order = (1, 2) if pick == 0 else (2, 1)

        async def lock_both(session: AsyncSession) -> tuple[int, int]:
            await session.execute(text(f"SET LOCAL deadlock_timeout = '{DEADLOCK_TIMEOUT}'"))
            lock = text(f"SELECT id FROM {self.table} WHERE id = :id FOR UPDATE")
            await session.execute(lock, {"id": order[0]})
            if pause is not None:
                await pause()  # both hold their first row
            await session.execute(lock, {"id": order[1]})
            await session.execute(text(f"UPDATE {self.table} SET units = units + 1"))
            return order

        return lock_both

    async def broken_promises(self, observer: asyncpg.Connection, answers: list[Any]) -> list[str]:
        units = [row["units"] for row in await observer.fetch(f"SELECT units FROM {self.table}")]
        if units != [len(answers)] * 2:
            return [f"{len(answers)} units answered, the rows count {units}"]
        return []


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "doctors": Doctors,
    "transfers": Transfers,
    "deadlock": Deadlock,
}
STRESSED = ("doctors", "transfers")


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(name="open_manager")
async def open_manager_fixture(
    database_url: URL,
) -> AsyncIterator[Callable[[int], DatabaseSessionManager]]:
    """Opens private managers of `pool_size` connections (no overflow); closes them after."""
    managers: list[DatabaseSessionManager] = []

    def open_manager(pool_size: int) -> DatabaseSessionManager:
        manager = DatabaseSessionManager()
        manager.init(
            url=database_url,
            pool_size=pool_size,
            max_overflow=0,
            connect_args=application_name(f"conflict-retries-{os.getpid()}"),
        )
        managers.append(manager)
        return manager

    yield open_manager
    try:
        for manager in managers:
            assert checked_out(manager) == 0, "a unit of work kept its connection"
    finally:
        for manager in managers:
            await manager.close()


@asynccontextmanager
async def scenario_tables(
    observer: asyncpg.Connection, scenario: Scenario, size: int
) -> AsyncIterator[None]:
    await observer.execute(scenario.setup(size))
    try:
        yield
    finally:
        await observer.execute(scenario.teardown())


class Rendezvous:
    """Two units wait for each other, on their first attempt only (a retry goes straight on)."""

    def __init__(self) -> None:
        self._arrived = 0
        self._both = asyncio.Event()

    def pause(self) -> Pause:
        first = True

        async def meet() -> None:
            nonlocal first
            if not first:
                return
            first = False
            self._arrived += 1
            if self._arrived == 2:
                self._both.set()
            await asyncio.wait_for(self._both.wait(), RENDEZVOUS_SECONDS)

        return meet


# --- stress: WORKERS x ROUNDS ---------------------------------------------------------


@pytest.mark.parametrize("how", list(RUNNERS))
@pytest.mark.parametrize("name", STRESSED)
async def test_concurrent_conflicting_units_are_all_answered_when_retried(
    open_manager: Callable[[int], DatabaseSessionManager],
    observer: asyncpg.Connection,
    name: str,
    how: str,
) -> None:
    """WORKERS x ROUNDS units at the scenario's level: retried, all answered; once, 40001s.

    Either way, the committed data keeps the scenario's promise and matches the
    answers of the units that committed.
    """
    scenario = SCENARIOS[name]()
    manager = open_manager(WORKERS)
    runner = RUNNERS[how]
    outcome = Outcome()

    async def worker(index: int) -> None:
        rng = random.Random(f"{name}-{index}")
        for _ in range(ROUNDS):
            await run_unit(manager, runner, scenario.level, scenario.unit(rng), outcome)

    async with scenario_tables(observer, scenario, WORKERS * ROUNDS):
        await asyncio.gather(*(worker(index) for index in range(WORKERS)))
        print(f"\n{name} at {scenario.level}, {how}, {WORKERS} x {ROUNDS}: {outcome.summary()}")

        assert outcome.unexpected_failures() == []
        assert await scenario.broken_promises(observer, outcome.answers) == []
        if how == RETRIED:
            assert outcome.failures == [], "a unit was not answered"
            assert outcome.retries > 0, "no conflict happened: the run proves nothing"
        else:
            assert outcome.failures, "no conflict happened: the run proves nothing"
            assert outcome.calls == len(outcome.calls_per_unit), "a unit was run twice"


# --- pairs: the conflict made certain ------------------------------------------------


async def run_pair(
    manager: DatabaseSessionManager,
    scenario: Scenario,
    runner: Runner,
    level: str,
    outcome: Outcome,
    seed: str,
) -> None:
    """Two units of `scenario` at `level`, each paused at its point of conflict until both are."""
    rendezvous = Rendezvous()
    rng = random.Random(seed)
    await asyncio.gather(
        *(
            run_unit(manager, runner, level, scenario.unit(rng, rendezvous.pause(), pick), outcome)
            for pick in (0, 1)
        )
    )


@pytest.mark.parametrize("how", list(RUNNERS))
@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_two_units_meeting_at_the_conflict(
    open_manager: Callable[[int], DatabaseSessionManager],
    observer: asyncpg.Connection,
    name: str,
    how: str,
) -> None:
    """Two units paused at the point of conflict: one is retried, or fails once."""
    scenario = SCENARIOS[name]()
    outcome = Outcome()

    async with scenario_tables(observer, scenario, 2):
        await run_pair(open_manager(2), scenario, RUNNERS[how], scenario.level, outcome, name)
        print(f"\n{name} pair at {scenario.level}, {how}: {outcome.summary()}")

        assert await scenario.broken_promises(observer, outcome.answers) == []
        if how == RETRIED:
            assert outcome.failures == []
            # Usually [1, 2]; a retry that starts before the other unit commits may
            # lose again to it.
            assert min(outcome.calls_per_unit) == 1
            assert outcome.retries >= 1, "no conflict happened: the run proves nothing"
        else:
            assert len(outcome.answers) == 1
            assert outcome.failure_states() == {scenario.conflict: 1}
            assert outcome.unexpected_failures() == []
            assert outcome.calls_per_unit == [1, 1]


@pytest.mark.parametrize("name", [name for name in SCENARIOS if SCENARIOS[name]().weak_level])
async def test_at_a_weaker_level_the_same_pair_breaks_the_promise(
    open_manager: Callable[[int], DatabaseSessionManager],
    observer: asyncpg.Connection,
    name: str,
) -> None:
    """Control: at READ COMMITTED nothing conflicts, and the check sees the damage."""
    scenario = SCENARIOS[name]()
    assert scenario.weak_level is not None
    outcome = Outcome()

    async with scenario_tables(observer, scenario, 2):
        await run_pair(open_manager(2), scenario, run_retried, scenario.weak_level, outcome, name)

        assert outcome.failures == []
        assert outcome.calls_per_unit == [1, 1]
        assert await scenario.broken_promises(observer, outcome.answers) != []


# --- the retry budget -----------------------------------------------------------------


@pytest.fixture(name="conflict_table")
async def conflict_table_fixture(observer: asyncpg.Connection) -> AsyncIterator[str]:
    """A table whose rows with `conflict` set fail COMMIT with a serialization failure.

    A deferred constraint trigger raises at COMMIT, as SERIALIZABLE's own checks do.
    """
    table = unique_table("retry_budget")
    await observer.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, conflict bool NOT NULL DEFAULT false);"
        f" INSERT INTO {table} (id) VALUES (1)"
    )
    await fail_commit_when(observer, table, "conflict")
    try:
        yield table
    finally:
        await drop_fail_commit(observer, table)
        await observer.execute(f"DROP TABLE IF EXISTS {table}")


def conflicting_work(table: str, where: str, conflicting_calls: int) -> tuple[Work, list[int]]:
    """Work that fails with 40001 on its first `conflicting_calls` calls, then inserts a row.

    `where`: "statement" (a DO block raises) or "commit" (a deferred trigger raises).
    Returns the work and the list its calls are counted in.
    """
    calls: list[int] = []

    async def work(session: AsyncSession) -> int:
        calls.append(len(calls) + 1)
        call = len(calls)
        conflict = call <= conflicting_calls
        if conflict and where == "statement":
            await session.execute(text(RAISE_SERIALIZATION_FAILURE))
        await session.execute(
            text(f"INSERT INTO {table} (id, conflict) VALUES (:id, :conflict)"),
            {"id": 100 + call, "conflict": conflict and where == "commit"},
        )
        return call

    return work, calls


@pytest.mark.parametrize("where", ["statement", "commit"])
@pytest.mark.parametrize("attempts", [1, 3, 5])
async def test_a_conflict_on_every_attempt_is_raised_after_the_last(
    open_manager: Callable[[int], DatabaseSessionManager],
    observer: asyncpg.Connection,
    conflict_table: str,
    where: str,
    attempts: int,
) -> None:
    """`work` runs exactly `attempts` times; the last 40001 propagates, classified RETRYABLE."""
    manager = open_manager(1)
    work, calls = conflicting_work(conflict_table, where, conflicting_calls=attempts)

    with pytest.raises(Exception) as raised:  # noqa: PT011 - examined below
        await manager.run_in_transaction(work, attempts=attempts)

    assert len(calls) == attempts
    assert classify_error(raised.value) is DatabaseErrorKind.RETRYABLE
    assert sqlstate_of(raised.value) == SERIALIZATION_FAILURE
    assert await observer.fetchval(f"SELECT count(*) FROM {conflict_table}") == 1


@pytest.mark.parametrize("where", ["statement", "commit"])
async def test_a_conflict_on_the_first_attempts_is_retried_until_one_commits(
    open_manager: Callable[[int], DatabaseSessionManager],
    observer: asyncpg.Connection,
    conflict_table: str,
    where: str,
) -> None:
    """Two conflicts, then success within 3 attempts: the third call's result is returned."""
    manager = open_manager(1)
    work, calls = conflicting_work(conflict_table, where, conflicting_calls=2)

    assert await manager.run_in_transaction(work, attempts=3) == 3

    assert calls == [1, 2, 3]
    rows = await observer.fetch(f"SELECT id FROM {conflict_table} ORDER BY id")
    assert [row["id"] for row in rows] == [1, 103], "only the committed attempt's row is kept"


@pytest.mark.parametrize("where", ["statement", "commit"])
async def test_a_unique_violation_is_not_retried(
    open_manager: Callable[[int], DatabaseSessionManager],
    observer: asyncpg.Connection,
    where: str,
) -> None:
    """A conflict of data (23505), at the INSERT or at COMMIT (deferred key): one call only."""
    table = unique_table("retry_unique")
    deferred = " DEFERRABLE INITIALLY DEFERRED" if where == "commit" else ""
    await observer.execute(
        f"CREATE TABLE {table} (id int, UNIQUE (id){deferred}); INSERT INTO {table} VALUES (1)"
    )
    manager = open_manager(1)
    calls = 0

    async def insert_duplicate(session: AsyncSession) -> None:
        nonlocal calls
        calls += 1
        await session.execute(text(f"INSERT INTO {table} VALUES (1)"))

    try:
        with pytest.raises(Exception) as raised:  # noqa: PT011 - examined below
            await manager.run_in_transaction(insert_duplicate, attempts=3)
    finally:
        await observer.execute(f"DROP TABLE IF EXISTS {table}")

    assert calls == 1
    assert classify_error(raised.value) is DatabaseErrorKind.CONFLICT
    assert sqlstate_of(raised.value) == "23505"


# --- the route mechanism ---------------------------------------------------------------

REQUESTS = 50
CONCURRENCY = 10
# Ten requests on one row: each round only one commits, so a request can lose
# many times in a row (RetryingRoute's default of 3 is not enough; see the summary).
ROUTE_ATTEMPTS = 30
SerializableSessionDep = Annotated[
    AsyncSession, Depends(session_dependency(isolation_level="SERIALIZABLE"), scope="function")
]


def counter_app(table: str, route_class: type[RetryingRoute], calls: Counter[int]) -> FastAPI:
    """POST /increment adds 1 to a counter under SERIALIZABLE and answers the value it wrote.

    The reference service's error handlers answer a conflict left after the last
    attempt with 503 and Retry-After. `calls` counts the handler's runs per request.
    """
    router = APIRouter(route_class=route_class)

    @router.post("/increment")
    async def increment(request: int, db: SerializableSessionDep) -> dict[str, int]:
        calls[request] += 1
        value = (await db.execute(text(f"SELECT value FROM {table} WHERE id = 1"))).scalar_one()
        await db.execute(
            text(f"UPDATE {table} SET value = :value WHERE id = 1"), {"value": value + 1}
        )
        return {"value": value + 1}

    app = FastAPI()
    app.include_router(router)
    install_error_handlers(app)
    return app


@asynccontextmanager
async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


@asynccontextmanager
async def uvicorn_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(app) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        yield client


TRANSPORTS = {"asgi": asgi_client, "uvicorn": uvicorn_client}
ROUTE_CLASSES: dict[str, Callable[[], type[RetryingRoute]]] = {
    "retried": lambda: retrying_route_class(attempts=ROUTE_ATTEMPTS),
    "attempts=1": lambda: retrying_route_class(attempts=1),
}


@pytest.fixture(name="counter_table")
async def counter_table_fixture(observer: asyncpg.Connection) -> AsyncIterator[str]:
    table = unique_table("retry_counter")
    await observer.execute(
        f"CREATE TABLE {table} (id int PRIMARY KEY, value int NOT NULL);"
        f"INSERT INTO {table} VALUES (1, 0)"
    )
    try:
        yield table
    finally:
        await observer.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.mark.parametrize("route", list(ROUTE_CLASSES))
@pytest.mark.parametrize("transport", list(TRANSPORTS))
async def test_a_retrying_route_answers_each_request_once_with_what_it_committed(
    open_manager: Callable[[int], DatabaseSessionManager],
    observer: asyncpg.Connection,
    counter_table: str,
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
    route: str,
) -> None:
    """REQUESTS concurrent increments: all 200, answering 1..REQUESTS; once, some 503s.

    Either way the counter equals the number of 200 answers, and their values are
    exactly 1..that number: no answer for an increment rolled back, none lost.
    """
    manager = open_manager(CONCURRENCY)
    monkeypatch.setattr(_fastapi, "session_manager", manager)
    calls: Counter[int] = Counter()
    app = counter_app(counter_table, ROUTE_CLASSES[route](), calls)
    limit = asyncio.Semaphore(CONCURRENCY)

    async with TRANSPORTS[transport](app) as client:

        async def post(request: int) -> httpx.Response:
            async with limit:
                return await client.post("/increment", params={"request": request})

        responses = await asyncio.gather(*(post(request) for request in range(REQUESTS)))

    statuses = Counter(response.status_code for response in responses)
    values = sorted(response.json()["value"] for response in responses if response.is_success)
    committed = await observer.fetchval(f"SELECT value FROM {counter_table} WHERE id = 1")
    handled = sum(calls.values())
    print(
        f"\n{transport}, {route}: {REQUESTS} requests at concurrency {CONCURRENCY}, "
        f"statuses {dict(statuses)}, {handled} handler calls ({handled - REQUESTS} retries), "
        f"at most {max(calls.values())} for one request, "
        f"attempts per request {dict(sorted(Counter(calls.values()).items()))}"
    )

    assert values == list(range(1, len(values) + 1)), "an answer that was not committed"
    assert committed == len(values)
    assert sorted(calls) == list(range(REQUESTS)), "a request never reached its handler"
    if route == "retried":
        assert statuses == {200: REQUESTS}
        assert handled > REQUESTS, "no conflict happened: the run proves nothing"
    else:
        assert set(statuses) == {200, 503}, "no conflict happened: the run proves nothing"
        refused = [response for response in responses if response.status_code == 503]
        assert all(response.headers.get("Retry-After") for response in refused)
        assert handled == REQUESTS
