"""Clean shutdown (Z-01 to Z-06): `close()` with work in flight, and SIGTERM to a uvicorn process.

Each test names its backends and rows uniquely on the fault cluster, and checks what the
server was left with from a superuser connection of its own.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field

import asyncpg
import httpx
import pytest
from sqlalchemy import event, exc, text
from sqlalchemy.engine import URL

from app.database import DatabaseNotInitializedError, DatabaseSessionManager
from app.database._closing import CANCEL_TIMEOUT_SECONDS
from tests.drivers import DRIVER, application_name
from tests.faults.proxy import FaultProxy
from tests.faults.server import FaultServer
from tests.faults.service import Service, running_service
from tests.postgres import count_backends, settled_backend_count

CLOSED_HINT = (
    "DatabaseSessionManager is closed: `close()` was called, so no new sessions can start; "
    "call `session_manager.init(url=...)` to reopen it"
)
# What a clean exit never writes to stderr.
DIRTY_EXIT_MARKERS = (
    "garbage collector",
    "Event loop is closed",
    "Task was destroyed but it is pending",
    "was never awaited",
    "Exception closing connection",
    "Exception terminating connection",
    "Warning:",
    "Traceback",
)
# uvicorn logs each request task it cancels at the end of its graceful timeout; that
# traceback is uvicorn's report of its own decision, not a fault of the app.
UVICORN_CANCELLED_REQUEST = re.compile(
    r"ERROR: +Exception in ASGI application\n"
    r"Traceback \(most recent call last\):\n"
    r"(?: .*\n)+"
    r"asyncio\.exceptions\.CancelledError: Task cancelled, timeout graceful shutdown exceeded\n"
)
# What the driver writes when it garbage-collects a connection nobody closed.
UNCLOSED = "unclosed connection" if DRIVER == "asyncpg" else "deleted while still open"
# Bounds generous enough for a busy 2-core machine; each names what it bounds.
SETTLE_SECONDS = 1.0  # for the server to see a closed connection go
_names = itertools.count()


def _unique_name() -> str:
    """An application_name (and row-name prefix) no other test or worker uses."""
    return f"h5-shutdown-{os.getpid()}-{next(_names)}"


async def active_statements(observer: asyncpg.Connection, name: str, query_prefix: str) -> int:
    """How many of `name`'s backends are running a statement starting with `query_prefix`."""
    count: int = await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE application_name = $1 AND state = 'active' AND query LIKE $2",
        name,
        query_prefix + "%",
    )
    return count


async def until(condition: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    """Poll `condition()` (a coroutine function) until it holds; fail naming `what`."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {within} s")
        await asyncio.sleep(0.02)


async def committed(observer: asyncpg.Connection, names: list[str]) -> set[str]:
    """Which of `names` are committed rows of `items`."""
    rows = await observer.fetch("SELECT name FROM items WHERE name = ANY($1::text[])", names)
    return {row["name"] for row in rows}


def open_manager(manager: DatabaseSessionManager, url: URL, name: str) -> None:
    """`init()` on `url`, with backends named `name`."""
    manager.init(url, connect_args=application_name(name))


def count_cuts(manager: DatabaseSessionManager) -> list[object]:
    """A list that grows by one for each connection the manager's pool invalidates."""
    cuts: list[object] = []
    event.listen(manager.engine.sync_engine, "invalidate", lambda *args: cuts.append(args))
    return cuts


@dataclass
class UnitOfWork:
    """One `session()` block that inserts a row, says so, then sleeps in the database.

    Given `release`, it waits for that event instead (connection held, transaction
    open), so that a test decides when it ends.
    """

    manager: DatabaseSessionManager
    name: str
    seconds: float
    release: asyncio.Event | None = None
    in_flight: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: float = 0.0

    async def run(self) -> None:
        try:
            async with self.manager.session() as session:
                await session.execute(
                    text("INSERT INTO items (name) VALUES (:name)"), {"name": self.name}
                )
                self.in_flight.set()
                if self.release is not None:
                    await self.release.wait()
                else:
                    await session.execute(text("SELECT pg_sleep(:s)"), {"s": self.seconds})
        finally:
            self.ended_at = time.monotonic()


async def start_units(
    manager: DatabaseSessionManager, name: str, count: int, seconds: float
) -> tuple[list[UnitOfWork], list[asyncio.Task[None]]]:
    """Start `count` units of work and return once each has inserted its row."""
    units = [UnitOfWork(manager, f"{name}-row-{i}", seconds) for i in range(count)]
    tasks = [asyncio.create_task(unit.run()) for unit in units]
    await asyncio.wait_for(asyncio.gather(*(unit.in_flight.wait() for unit in units)), 10)
    return units, tasks


@contextmanager
def gc_findings() -> Iterator[list[str]]:
    """Record the warnings and unraisable errors of the block and of a gc.collect() after it."""
    findings: list[str] = []
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: findings.append(repr(unraisable.exc_value))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield findings
            gc.collect()
        findings.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        sys.unraisablehook = hook


@pytest.fixture(name="observer")
async def observer_fixture(fault_server: FaultServer) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection straight to the fault cluster, outside any code under test."""
    connection = await asyncpg.connect(fault_server.superuser_dsn())
    yield connection
    await connection.execute("DELETE FROM items WHERE name LIKE 'h5-shutdown-%'")
    await connection.close()


@pytest.fixture(name="manager")
async def manager_fixture() -> AsyncIterator[DatabaseSessionManager]:
    """A manager of the test's own; closed at the end whatever the test did."""
    manager = DatabaseSessionManager()
    yield manager
    await manager.close(grace=0)


async def test_idle_close_is_prompt_and_leaves_no_backend_or_warning(
    fault_server: FaultServer, observer: asyncpg.Connection, manager: DatabaseSessionManager
) -> None:
    """Z-01: close() after traffic returns at once, the backends go, and gc finds nothing."""
    name = _unique_name()
    open_manager(manager, fault_server.app_url(), name)
    units, tasks = await start_units(manager, name, 3, 0.05)
    await asyncio.gather(*tasks)
    assert await count_backends(observer, name) == 3, "the pool keeps its connections"
    gc.collect()  # earlier tests' garbage is theirs

    with gc_findings() as findings:
        started = time.monotonic()
        await manager.close()
        duration = time.monotonic() - started
        left = await settled_backend_count(observer, name, 0, within=SETTLE_SECONDS)

    print(f"\n[Z-01] close duration idle: {duration * 1000:.1f} ms, 3 connections")
    assert duration < 1.0, f"an idle close() took {duration:.2f} s"
    assert left == 0, f"{left} backends still open {SETTLE_SECONDS} s after close()"
    assert findings == []
    assert await committed(observer, [unit.name for unit in units]) == {u.name for u in units}


async def test_dropping_an_open_manager_without_close_warns(
    fault_server: FaultServer, observer: asyncpg.Connection
) -> None:
    """Z-06, the negative control: without close(), gc reports each unclosed connection."""
    name = _unique_name()
    manager = DatabaseSessionManager()
    open_manager(manager, fault_server.app_url(), name)
    units, tasks = await start_units(manager, name, 3, 0.05)
    await asyncio.gather(*tasks)
    gc.collect()

    with gc_findings() as findings:
        del manager, units, tasks

    unclosed = [f for f in findings if UNCLOSED in f]
    assert len(unclosed) == 3, findings
    assert await settled_backend_count(observer, name, 0, within=SETTLE_SECONDS) == 0


async def test_units_of_work_finishing_within_grace_commit(
    fault_server: FaultServer, observer: asyncpg.Connection, manager: DatabaseSessionManager
) -> None:
    """Z-04a: close() waits for units of work that end within grace; their rows commit."""
    name = _unique_name()
    open_manager(manager, fault_server.app_url(), name)
    cuts = count_cuts(manager)
    units, tasks = await start_units(manager, name, 3, 0.3)

    started = time.monotonic()
    await manager.close(grace=5.0)
    duration = time.monotonic() - started
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)

    print(f"\n[Z-04a] close with work in flight: grace 5.0 s, cut {len(cuts)}, {duration:.2f} s")
    assert outcomes == [None, None, None]
    assert cuts == []
    assert duration < 5.0, "close() waited out the grace period for work that had ended"
    assert await committed(observer, [u.name for u in units]) == {u.name for u in units}
    assert await settled_backend_count(observer, name, 0, within=SETTLE_SECONDS) == 0


async def test_units_of_work_outlasting_grace_are_cut_and_roll_back(
    fault_server: FaultServer, observer: asyncpg.Connection, manager: DatabaseSessionManager
) -> None:
    """Z-04b: after grace, busy connections are cut; their work fails, rolls back, and stops."""
    grace = 0.5
    name = _unique_name()
    open_manager(manager, fault_server.app_url(), name)
    cuts = count_cuts(manager)
    units, tasks = await start_units(manager, name, 3, 5.0)
    gc.collect()

    with gc_findings() as findings:
        started = time.monotonic()
        await manager.close(grace=grace)
        duration = time.monotonic() - started
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        # The server must stop the statements too: a backend left running pg_sleep
        # would hold its transaction (and its locks) open after the process is gone.
        left = await settled_backend_count(observer, name, 0, within=SETTLE_SECONDS)

    print(
        f"\n[Z-04b] close with work in flight: grace {grace} s, cut {len(cuts)}, {duration:.2f} s"
    )
    # close() also waits for the cut backends' CancelRequests, repeated for 0.5 s.
    bound = grace + 1.5
    assert duration <= bound, f"close() took {duration:.2f} s with grace={grace}"
    assert len(cuts) == 3
    for outcome in outcomes:
        assert isinstance(outcome, exc.DBAPIError), outcome
        assert outcome.connection_invalidated, outcome
    for unit in units:
        assert unit.ended_at - started <= grace + 1.0, "a cut unit of work kept waiting"
    assert left == 0, "backends outlived close()"
    assert await committed(observer, [u.name for u in units]) == set()
    assert findings == []


async def test_session_after_close_began_is_refused_without_connecting(
    fault_server: FaultServer, observer: asyncpg.Connection, manager: DatabaseSessionManager
) -> None:
    """Z-04c: a session() started while close() drains raises the typed error, opens nothing."""
    name = _unique_name()
    open_manager(manager, fault_server.app_url(), name)
    # The unit of work ends when the test says so, not after some time: close() is
    # then still draining at every check below, however slow the machine.
    release = asyncio.Event()
    unit = UnitOfWork(manager, f"{name}-row-0", 0.0, release)
    task = asyncio.create_task(unit.run())
    await asyncio.wait_for(unit.in_flight.wait(), 10)
    closing = asyncio.create_task(manager.close(grace=30.0))
    try:
        await asyncio.sleep(0)  # close() refuses new sessions before its first await
        before = await count_backends(observer, name)

        with pytest.raises(DatabaseNotInitializedError, match=re.escape(CLOSED_HINT)):
            async with manager.session() as session:
                await session.execute(text("SELECT 1"))

        assert await count_backends(observer, name) == before == 1
        assert not closing.done(), "close() should still be waiting for the unit of work"
    finally:
        release.set()
        await asyncio.wait_for(closing, 10)
        await task
    assert await committed(observer, [unit.name]) == {unit.name}


async def test_init_works_again_after_close_even_one_that_cut_connections(
    fault_server: FaultServer, observer: asyncpg.Connection, manager: DatabaseSessionManager
) -> None:
    """init() after close() gives a working manager, also straight after a close() that cut."""
    name = _unique_name()
    open_manager(manager, fault_server.app_url(), name)
    _, first = await start_units(manager, name + "-a", 1, 0.01)
    await asyncio.gather(*first)
    await manager.close()

    open_manager(manager, fault_server.app_url(), name)
    units, stuck = await start_units(manager, name + "-b", 1, 5.0)
    await manager.close(grace=0.2)
    (outcome,) = await asyncio.gather(*stuck, return_exceptions=True)
    assert isinstance(outcome, exc.DBAPIError), outcome

    open_manager(manager, fault_server.app_url(), name)
    after, tasks = await start_units(manager, name + "-c", 1, 0.01)
    await asyncio.gather(*tasks)
    await manager.close()

    assert await committed(observer, [units[0].name, after[0].name]) == {after[0].name}
    assert await settled_backend_count(observer, name, 0, within=SETTLE_SECONDS) == 0


async def test_close_returns_within_grace_when_the_database_is_unreachable(
    fault_server: FaultServer, proxy: FaultProxy, manager: DatabaseSessionManager
) -> None:
    """Z-05: with the network stalled, close() cuts and disposes within grace + cancel + 1 s."""
    grace = 0.5
    name = _unique_name()
    open_manager(manager, fault_server.app_url(port=proxy.port), name)
    _, warm = await start_units(manager, name + "-idle", 4, 0.05)
    await asyncio.gather(*warm)  # four connections in the pool; three stay idle
    (unit,), stuck = await start_units(manager, name + "-stuck", 1, 5.0)
    proxy.stall()
    try:
        started = time.monotonic()
        await asyncio.wait_for(manager.close(grace=grace), 30)
        duration = time.monotonic() - started
        (outcome,) = await asyncio.gather(*stuck, return_exceptions=True)
    finally:
        proxy.restore()  # the proxy cannot stop while its pumps wait to flow again

    print(f"\n[Z-05] close with the network stalled: grace {grace} s, {duration:.2f} s")
    # close() also waits (bounded) for the CancelRequest sent for the cut connection,
    # which cannot get through a stalled network.
    bound = grace + CANCEL_TIMEOUT_SECONDS + 1.0
    assert duration <= bound, f"close() took {duration:.2f} s on a stalled network"
    assert isinstance(outcome, exc.DBAPIError), outcome
    assert unit.ended_at - started <= bound, "the stuck unit of work kept waiting"


# --- Z-02 / Z-03: SIGTERM to a uvicorn process with requests in flight --------------


@dataclass(frozen=True)
class SigtermCase:
    """How long each request sleeps in the database, and uvicorn's graceful timeout."""

    scenario: str
    request_seconds: float
    graceful_seconds: int
    expect_completed: int


REQUESTS = 20
SIGTERM_CASES = {
    # Z-02: the requests end well within the graceful timeout.
    "requests-finish": SigtermCase(
        "Z-02", request_seconds=1.0, graceful_seconds=5, expect_completed=20
    ),
    # Z-03: uvicorn cancels the requests when its graceful timeout ends.
    "grace-shorter": SigtermCase(
        "Z-03", request_seconds=5.0, graceful_seconds=1, expect_completed=0
    ),
}


@asynccontextmanager
async def shutdown_service(url: URL, name: str, graceful_seconds: int) -> AsyncIterator[Service]:
    """tests/faults/shutdown_app.py under uvicorn, its backends named `name`, once it serves."""
    async with running_service(
        url,
        app="tests.faults.shutdown_app:app",
        ready="answering",  # it has no /health: a 404 means its startup (init()) is done
        log_level="info",  # uvicorn's default: all it says about the shutdown is scanned
        uvicorn_args=("--timeout-graceful-shutdown", str(graceful_seconds)),
        python_args=("-W", "default"),  # shows ResourceWarning, which Python hides by default
        env={"SHUTDOWN_APP_NAME": name},
    ) as service:
        yield service


async def _post(client: httpx.AsyncClient, row: str, seconds: float) -> int | str:
    """The status code, or the transport error's name."""
    try:
        response = await client.post(f"/slow/{row}", params={"seconds": seconds})
    except httpx.TransportError as error:
        return type(error).__name__
    return response.status_code


async def _longest_idle_in_transaction(observer: asyncpg.Connection, name: str) -> float:
    """How long the longest-idle of `name`'s open transactions has been idle, in seconds."""
    seconds: float | None = await observer.fetchval(
        "SELECT max(extract(epoch FROM now() - state_change)) FROM pg_stat_activity"
        " WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
        name,
    )
    return seconds or 0.0


@pytest.mark.parametrize("case", SIGTERM_CASES.values(), ids=SIGTERM_CASES.keys())
async def test_sigterm_with_requests_in_flight_loses_nothing_and_exits_clean(
    fault_server: FaultServer, observer: asyncpg.Connection, case: SigtermCase
) -> None:
    """Z-02/Z-03: 2xx means committed, the rest left no row, and the exit is prompt and clean."""
    name = _unique_name()
    rows = [f"{name}-row-{i}" for i in range(REQUESTS)]
    async with (
        shutdown_service(fault_server.app_url(), name, case.graceful_seconds) as service,
        httpx.AsyncClient(base_url=service.base_url, timeout=30) as client,
    ):
        requests = [asyncio.create_task(_post(client, row, case.request_seconds)) for row in rows]

        async def all_in_flight() -> bool:
            return await active_statements(observer, name, "SELECT pg_sleep") == REQUESTS

        await until(all_in_flight, f"{REQUESTS} requests sleeping in the database")
        service.process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        exited = asyncio.create_task(service.process.wait())
        longest_idle_in_transaction = 0.0
        while not exited.done():
            longest_idle_in_transaction = max(
                longest_idle_in_transaction, await _longest_idle_in_transaction(observer, name)
            )
            await asyncio.wait([exited], timeout=0.1)
        exit_seconds = time.monotonic() - sent
        returncode = await exited
        outcomes = await asyncio.gather(*requests)
        left = await settled_backend_count(observer, name, 0, within=SETTLE_SECONDS)
    stderr = service.stderr

    completed = [
        row for row, o in zip(rows, outcomes, strict=True) if isinstance(o, int) and o < 300
    ]
    present = await committed(observer, rows)
    lost = set(completed) - present
    partial = present - set(completed)
    cancelled_logs = len(UVICORN_CANCELLED_REQUEST.findall(stderr))
    rest = UVICORN_CANCELLED_REQUEST.sub("", stderr)
    print(
        f"\n[{case.scenario}] SIGTERM->exit {exit_seconds:.2f} s"
        f" (graceful {case.graceful_seconds} s, requests {case.request_seconds} s):"
        f" 2xx {len(completed)}, cut {REQUESTS - len(completed)}"
        f" ({sorted({str(o) for o in outcomes})}), LOST {len(lost)}, partial {len(partial)},"
        f" backends left 1 s after exit {left},"
        f" longest idle in transaction {longest_idle_in_transaction:.2f} s,"
        f" uvicorn cancellation tracebacks {cancelled_logs}"
    )
    assert lost == set(), "a 2xx request's row is missing"
    assert partial == set(), "a request that failed left its row"
    assert len(completed) == case.expect_completed, outcomes
    assert returncode in (0, -signal.SIGTERM), stderr
    assert exit_seconds <= case.graceful_seconds + 3.0, f"exit took {exit_seconds:.2f} s"
    assert left == 0, f"{left} backends outlived the process by {SETTLE_SECONDS} s"
    assert longest_idle_in_transaction <= 1.0
    assert cancelled_logs <= REQUESTS - len(completed)
    for marker in DIRTY_EXIT_MARKERS:
        assert marker not in rest, f"{marker!r} in uvicorn's stderr:\n{stderr}"
        assert marker not in service.stdout, f"{marker!r} in uvicorn's stdout:\n{service.stdout}"
