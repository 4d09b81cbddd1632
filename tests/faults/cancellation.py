"""Cancel units of work at seeded random phases, then check that nothing leaked (C-01..C-03, C-06).

The driver of tests/faults/test_cancellation.py, and a soak run of its own:
`python -m tests.faults.cancellation --iterations 1000 --url postgresql+asyncpg://postgres@127.0.0.1:5432/postgres`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import random
import secrets
import socket
import struct
import sys
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio
import asyncpg
import httpx
from fastapi import FastAPI, HTTPException, Request, Response
from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import QueuePool
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.database import AsyncSessionDep, DatabaseSessionManager, _fastapi, _liveness
from app.database.testing import create_test_database, drop_test_database
from tests.integration.live_server import serve
from tests.postgres import asyncpg_dsn

# Phases a cancellation can land in, in the order a unit of work passes them:
# waiting for a pooled (or new) connection; the liveness ping on checkout; BEGIN in
# flight; a statement in flight; application code between statements; COMMIT in
# flight; closing the session (the rollback or reset that returns the connection).
PHASES = ("checkout", "ping", "begin", "statement", "between", "commit", "close")
# Before the route's first statement ("request", HTTP styles only), and after the
# connection went back to the pool ("after": nothing left to leak, not counted).
EDGES = ("request", "after")

STYLES = {
    "task": "C-01 task.cancel",
    "anyio": "C-02 anyio CancelScope",
    "asgi-task": "C-01 get_db over ASGI, task.cancel",
    "asgi-anyio": "C-02 get_db over ASGI, anyio CancelScope",
    "http": "C-03 uvicorn, client disconnect",
    "http-basemw": "C-03 uvicorn+BaseHTTPMiddleware, client disconnect",
}

POOL_CAPACITY = 4
POOL_TIMEOUT_SECONDS = 5.0  # a lost pool slot fails a checkout in 5 s instead of hanging
STATEMENT_SECONDS = 0.05  # the running statement: SELECT pg_sleep(...)
BETWEEN_SECONDS = 0.002  # application code between two statements
COMMIT_SECONDS = 0.02  # what the deferred trigger adds to COMMIT
FAIL_RATE = 0.2  # units of work that raise after writing, so their cleanup rolls back
AT_NEXT_AWAIT = 0.3  # share of targeted cancellations fired at the phase's first await
QUIESCENCE_SECONDS = 2.0
HEALTH_UNITS = 100
SERVER_DONE_SECONDS = 10.0  # how long an HTTP request may run on after its client left

# How long after its phase starts a targeted cancellation fires (uniform up to this).
# "any" arms at the start with a delay spanning the whole unit of work.
OFFSET_MAX = {
    "checkout": 0.005,
    "ping": 0.0005,
    "begin": 0.0005,
    "statement": STATEMENT_SECONDS,
    "between": BETWEEN_SECONDS,
    "commit": COMMIT_SECONDS,
    "close": 0.0,
    "any": 0.12,
}

TABLE = "h2_cancel_pairs"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    style text NOT NULL,
    iteration int NOT NULL,
    part smallint NOT NULL,
    PRIMARY KEY (style, iteration, part)
);
CREATE OR REPLACE FUNCTION h2_cancel_slow_commit() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_sleep({COMMIT_SECONDS}); RETURN NULL; END $$;
DROP TRIGGER IF EXISTS h2_cancel_slow_commit ON {TABLE};
CREATE CONSTRAINT TRIGGER h2_cancel_slow_commit AFTER INSERT ON {TABLE}
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.part = 2)
    EXECUTE FUNCTION h2_cancel_slow_commit();
"""
DROP_SCHEMA = f"""
DROP TABLE IF EXISTS {TABLE};
DROP FUNCTION IF EXISTS h2_cancel_slow_commit();
"""
INSERT = text(f"INSERT INTO {TABLE} (style, iteration, part) VALUES (:style, :iteration, :part)")

# Log lines that mean a task, a coroutine or a connection was abandoned.
NOISE = (
    "exception was never retrieved",
    "Task was destroyed but it is pending",
    "garbage collector",
    "Event loop is closed",
    "was never awaited",
    "attached to a different loop",
)
NOISE_LOGGERS = ("asyncio", "sqlalchemy.pool", "uvicorn.error")
# asyncpg 0.32 (sslmode=prefer, its default) sets an exception nobody reads on its
# SSL-negotiation future when a connect() is cancelled: "Future exception was never
# retrieved ... ConnectionError('unexpected connection_lost() call')". Plain asyncpg
# shows it too (64 of 284 cancelled connects; none with ssl=False), and nothing
# leaks, so it is counted apart instead of failing the run.
ASYNCPG_CONNECT_NOISE = "unexpected connection_lost() call"


class AppError(Exception):
    """Raised by a unit of work after its writes, so that its cleanup has to roll back."""


@dataclass
class Iteration:
    """One unit of work, the phase it has reached, and when to cancel it."""

    style: str
    number: int
    target: str  # a phase of PHASES, or "any"
    offset: float  # seconds after the target phase starts
    fail: bool
    hold_pool: bool  # other holders saturate the pool, so checkout has to wait
    phase: str = "request"
    landed: str | None = None  # the phase the cancellation was delivered in
    outcome: str = "pending"  # completed | failed | cancelled | error: ...
    began: bool = False  # BEGIN of the current checkout has completed
    client_gone: bool = False  # HTTP: the client reset its connection before the response
    cancel: Callable[[], Any] | None = None
    server_done: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self, phase: str) -> None:
        """Record that the unit of work reached `phase`; arm the cancellation there."""
        self.phase = phase
        if phase == self.target or self.target == "any":  # "any": from the very start
            self.target = ""  # arm once
            loop = asyncio.get_running_loop()
            if self.offset <= 0:
                loop.call_soon(self.fire)  # at the phase's first await
            else:
                loop.call_later(self.offset, self.fire)

    def fire(self) -> None:
        """Deliver the cancellation, noting the phase it lands in."""
        self.landed = self.phase
        if self.cancel is not None:
            self.cancel()


_CURRENT: ContextVar[Iteration | None] = ContextVar("h2_cancel_iteration", default=None)


def _enter(phase: str) -> None:
    # Events run inside the unit of work's task, or in SQLAlchemy's cleanup task
    # created from it: both see its context, so its Iteration.
    iteration = _CURRENT.get()
    if iteration is not None:
        iteration.enter(phase)


# --- phase probes: SQLAlchemy events and asyncpg's query log -----------------------


def _watch_queries(dbapi_connection: Any, _: Any) -> None:
    # asyncpg logs a query when it completes: the end of BEGIN is the start of the
    # statement that caused it, which no SQLAlchemy event marks.
    dbapi_connection.driver_connection.add_query_logger(_query_done)


def _query_done(record: Any) -> None:
    iteration = _CURRENT.get()
    if iteration is None or record.exception is not None:
        return
    if record.query.startswith("BEGIN") and iteration.phase == "begin":
        iteration.began = True
        iteration.enter("statement")


def _checkout_starts(*_: Any) -> None:
    _enter("ping")  # inserted before the package's own checkout listener, which pings


def _checked_out(*_: Any) -> None:
    iteration = _CURRENT.get()
    if iteration is not None:
        iteration.began = False  # the first statement on this checkout sends BEGIN
        iteration.enter("begin")


def _statement_starts(*_: Any) -> None:
    iteration = _CURRENT.get()
    if iteration is not None and iteration.began:
        iteration.enter("statement")


@contextlib.contextmanager
def phase_probe(engine: AsyncEngine) -> Iterator[None]:
    """Record the phase each unit of work reaches, through `engine`'s events."""
    sync_engine = engine.sync_engine
    listeners: list[tuple[Any, str, Callable[..., None], dict[str, bool]]] = [
        (sync_engine.pool, "connect", _watch_queries, {}),
        (sync_engine, "checkout", _checkout_starts, {"insert": True}),
        (sync_engine, "checkout", _checked_out, {}),
        (sync_engine, "before_cursor_execute", _statement_starts, {}),
        (sync_engine, "after_cursor_execute", lambda *_: _enter("between"), {}),
        (sync_engine, "commit", lambda *_: _enter("commit"), {}),
        (sync_engine, "rollback", lambda *_: _enter("close"), {}),
        (sync_engine, "checkin", lambda *_: _enter("after"), {}),
    ]
    for target, name, function, options in listeners:
        event.listen(target, name, function, **options)
    # Every checkout pings (the package skips connections used within the last
    # second, which here would be nearly all of them): the ping is a phase too.
    fresh_seconds = _liveness.FRESH_SECONDS
    _liveness.FRESH_SECONDS = 0.0
    try:
        yield
    finally:
        _liveness.FRESH_SECONDS = fresh_seconds
        for target, name, function, _options in listeners:
            event.remove(target, name, function)


# --- the unit of work, and the ways to run and cancel it ------------------------------


async def write_pair(session: AsyncSession, iteration: Iteration) -> None:
    """Two rows in two statements around a running one: half of it must never commit."""
    values = {"style": iteration.style, "iteration": iteration.number}
    await session.execute(INSERT, {**values, "part": 1})
    await asyncio.sleep(BETWEEN_SECONDS)
    await session.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": STATEMENT_SECONDS})
    await session.execute(INSERT, {**values, "part": 2})
    if iteration.fail:
        raise AppError("refused after writing")


async def _direct_unit(manager: DatabaseSessionManager, iteration: Iteration) -> None:
    _CURRENT.set(iteration)
    iteration.enter("checkout")
    async with manager.session() as session:
        await write_pair(session, iteration)


def pair_app(registry: dict[tuple[str, int], Iteration], base_middleware: bool) -> FastAPI:
    """A FastAPI app whose route writes a pair through `AsyncSessionDep` (get_db)."""
    app = FastAPI()

    @app.post("/pairs/{style}/{number}")
    async def write(style: str, number: int, db: AsyncSessionDep) -> dict[str, int]:
        iteration = registry[(style, number)]
        _CURRENT.set(iteration)  # over uvicorn this is another task than the client's
        iteration.enter("checkout")
        try:
            await write_pair(db, iteration)
        except AppError:
            raise HTTPException(409, "refused after writing") from None
        return {"number": number}

    if base_middleware:

        async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

        app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    # Added last, so outside the BaseHTTPMiddleware (only Starlette's error layer is
    # further out, and it lets a cancellation through).
    app.add_middleware(_ServerSide, registry=registry)
    return app


class _ServerSide:
    """ASGI layer around the routes: records how the handling of each pair request ended."""

    def __init__(self, app: ASGIApp, registry: dict[tuple[str, int], Iteration]) -> None:
        self._app = app
        self._registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = str(scope.get("path", "")).split("/")
        iteration = self._registry.get((parts[2], int(parts[3]))) if len(parts) == 4 else None
        if iteration is None:
            await self._app(scope, receive, send)
            return
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        except asyncio.CancelledError:
            iteration.outcome = "cancelled"
            raise
        except BaseException as error:
            iteration.outcome = f"error: {error!r}"
            raise
        else:
            iteration.outcome = _STATUS_OUTCOMES.get(status, f"error: status {status}")
        finally:
            iteration.server_done.set()


_STATUS_OUTCOMES = {200: "completed", 409: "failed"}


@contextlib.contextmanager
def serving(manager: DatabaseSessionManager) -> Iterator[None]:
    """Make get_db (so AsyncSessionDep) use `manager` instead of the global session_manager."""
    # The run's manager has its own pool and application_name; the real get_db is
    # otherwise unchanged. Swapped in the namespace where get_db looks the name up.
    namespace = _fastapi.get_db.__globals__
    previous = namespace["session_manager"]
    namespace["session_manager"] = manager
    try:
        yield
    finally:
        namespace["session_manager"] = previous


def _outcome_of(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    if error is None:
        return "completed"
    if isinstance(error, AppError):
        return "failed"
    return f"error: {error!r}"


async def _run_task_style(iteration: Iteration, work: Callable[[], Any]) -> None:
    task: asyncio.Task[Any] = asyncio.create_task(work())
    iteration.cancel = task.cancel
    await asyncio.wait([task])
    iteration.outcome = _outcome_of(task)


async def _run_anyio_style(iteration: Iteration, work: Callable[[], Any]) -> None:
    async def scoped() -> bool:
        # Level-triggered, as in Starlette's task groups: once cancelled, every await
        # inside the scope is cancelled again until the scope exits.
        with anyio.CancelScope() as scope:
            iteration.cancel = scope.cancel
            await work()
        return scope.cancelled_caught

    task: asyncio.Task[bool] = asyncio.create_task(scoped())
    await asyncio.wait([task])
    outcome = _outcome_of(task)
    iteration.outcome = "cancelled" if outcome == "completed" and task.result() else outcome


async def _asgi_request(client: httpx.AsyncClient, iteration: Iteration) -> None:
    _CURRENT.set(iteration)
    iteration.enter("request")
    response = await client.post(f"/pairs/{iteration.style}/{iteration.number}")
    if response.status_code == 409:
        raise AppError("refused after writing")
    response.raise_for_status()


async def _http_request(base_url: str, iteration: Iteration) -> None:
    """Send the request over a raw socket, and reset the connection when fired."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    sock = writer.get_extra_info("socket")

    def disconnect() -> None:
        if writer.transport.is_closing():
            return  # the response came first
        # SO_LINGER 0: close with a RST, as a client whose process died would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        iteration.client_gone = True

    iteration.cancel = disconnect
    iteration.enter("request")
    path = f"/pairs/{iteration.style}/{iteration.number}"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n".encode())
    with contextlib.suppress(ConnectionError):
        await reader.read(1)  # the response's first byte, or EOF once disconnected
    if not writer.transport.is_closing():
        writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    # The server's side of the request may still be running: wait for its end.
    try:
        await asyncio.wait_for(iteration.server_done.wait(), SERVER_DONE_SECONDS)
    except asyncio.TimeoutError:
        iteration.outcome = f"error: the server still runs the request {SERVER_DONE_SECONDS} s on"


# --- invariants ----------------------------------------------------------------------


@dataclass
class ServerState:
    """The application's backends as PostgreSQL sees them."""

    backends: int
    idle_in_transaction: int
    locks: int


async def server_state(observer: Any, application_name: str) -> ServerState:
    """Count the backends of `application_name`, those idle in a transaction, their locks."""
    row = await observer.fetchrow(
        """
        SELECT count(*) AS backends,
               count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_transaction,
               (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = $1) AS locks
        FROM pg_stat_activity WHERE application_name = $1
        """,
        application_name,
    )
    return ServerState(row["backends"], row["idle_in_transaction"], row["locks"])


def checked_out(manager: DatabaseSessionManager) -> int:
    """How many of the manager's pooled connections are in use."""
    pool = manager.engine.pool
    assert isinstance(pool, QueuePool), f"expected a QueuePool, got {type(pool).__name__}"
    return pool.checkedout()


class Sampler:
    """Polls the server state while iterations run, keeping the maxima."""

    def __init__(self, dsn: str, application_name: str) -> None:
        self._dsn = dsn
        self._application_name = application_name
        self._stop = asyncio.Event()
        self.max_idle_in_transaction = 0
        self.max_backends = 0

    async def run(self) -> None:
        """Poll every 25 ms until `stop()`."""
        observer = await asyncpg.connect(
            self._dsn, server_settings={"application_name": f"h2-cancel-sampler-{os.getpid()}"}
        )
        try:
            while not self._stop.is_set():
                state = await server_state(observer, self._application_name)
                self.max_idle_in_transaction = max(
                    self.max_idle_in_transaction, state.idle_in_transaction
                )
                self.max_backends = max(self.max_backends, state.backends)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.025)
        finally:
            await observer.close()

    def stop(self) -> None:
        """Let `run()` return after its current poll."""
        self._stop.set()


@dataclass
class StyleReport:
    """The figures of one style's run; `violations()` lists what broke a promise."""

    style: str
    seed: int
    iterations: int
    outcomes: Counter[str] = field(default_factory=Counter)
    landed: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    leaked_connections: int = 0
    # Iterations whose caller was back before its connection was: cleanup still running.
    returned_early: int = 0
    leaky_iterations: int = 0  # still checked out 1 s after the iteration ended
    idle_in_transaction_max: int = 0
    idle_in_transaction_after: int = 0
    locks_after: int = 0
    backends_max: int = 0  # sampled while running: invalidated backends linger briefly
    backends_after: int = 0
    half_committed: int = 0
    late_commits: int = 0
    lost: int = 0  # completed, yet the pair is absent
    failed_but_committed: int = 0
    poisoned_after: int = 0
    invalidated: int = 0
    noise: list[str] = field(default_factory=list)
    asyncpg_connect_noise: int = 0
    seconds: float = 0.0

    def violations(self) -> list[str]:
        """Every broken promise, each with its figure."""
        checks = {
            "leaked_connections": self.leaked_connections,
            "returned_early": self.returned_early,
            "leaky_iterations": self.leaky_iterations,
            "idle_in_txn_after": self.idle_in_transaction_after,
            "locks_after": self.locks_after,
            "half_committed": self.half_committed,
            "lost": self.lost,
            "failed_but_committed": self.failed_but_committed,
            "poisoned_after": self.poisoned_after,
            "errors": len(self.errors),
            "warnings": len(self.noise),
        }
        found = [f"{name}={value}" for name, value in checks.items() if value]
        if self.backends_after > POOL_CAPACITY:
            found.append(f"backends_after={self.backends_after} > capacity {POOL_CAPACITY}")
        return found + self.errors[:5] + self.noise[:5]

    def line(self) -> str:
        """One line of figures, as the soak prints it."""
        hit = " ".join(f"{phase}={self.landed[phase]}" for phase in (*PHASES, *EDGES))
        return (
            f"[{STYLES[self.style]}] seed={self.seed} iterations={self.iterations} "
            f"cancelled={self.outcomes['cancelled']} completed={self.outcomes['completed']} "
            f"failed={self.outcomes['failed']} | leaked_connections={self.leaked_connections} "
            f"returned_early={self.returned_early} "
            f"idle_in_txn_max={self.idle_in_transaction_max} "
            f"idle_in_txn_after={self.idle_in_transaction_after} "
            f"backends_max={self.backends_max} backends_after={self.backends_after}/"
            f"{POOL_CAPACITY} locks_after={self.locks_after} "
            f"half_committed={self.half_committed} late_commits={self.late_commits} "
            f"lost={self.lost} poisoned_after={self.poisoned_after} "
            f"errors={len(self.errors)} warnings={len(self.noise)} "
            f"asyncpg_connect_noise={self.asyncpg_connect_noise} "
            f"invalidated={self.invalidated} {self.seconds:.1f}s | phases hit: {hit}"
        )


# --- the run -------------------------------------------------------------------------


def open_manager(url: URL, application_name: str) -> DatabaseSessionManager:
    """A manager of the run's own: small pool, bounded waits, its own application_name."""
    manager = DatabaseSessionManager()
    manager.init(
        url,
        pool_size=POOL_CAPACITY,
        max_overflow=0,
        pool_timeout=POOL_TIMEOUT_SECONDS,
        connect_args={"server_settings": {"application_name": application_name}},
    )
    return manager


def _plan(style: str, number: int, rng: random.Random) -> Iteration:
    target = rng.choice((*PHASES, "any"))
    longest = OFFSET_MAX[target]
    offset = 0.0 if rng.random() < AT_NEXT_AWAIT else rng.uniform(0, longest)
    fail = rng.random() < FAIL_RATE
    # A session that commits gives its connection back inside commit(), with no await
    # left to cancel: the close phase is the ROLLBACK of a unit of work that raised.
    # And one that raises never reaches COMMIT.
    fail = {"close": True, "commit": False}.get(target, fail)
    return Iteration(
        style=style,
        number=number,
        target=target,
        offset=offset,
        fail=fail,
        hold_pool=target == "checkout",
    )


@contextlib.asynccontextmanager
async def _pool_held(engine: AsyncEngine, release_after: float) -> AsyncIterator[None]:
    """Check out every pooled connection, and give them back after `release_after` s."""
    held = 0
    all_held = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        nonlocal held
        async with engine.connect():
            held += 1
            if held == POOL_CAPACITY:
                all_held.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(POOL_CAPACITY)]
    await all_held.wait()
    timer = asyncio.get_running_loop().call_later(release_after, release.set)
    try:
        yield
    finally:
        timer.cancel()
        release.set()
        await asyncio.gather(*holders)


async def _settled(manager: DatabaseSessionManager, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not checked_out(manager):
            return True
        await asyncio.sleep(0.005)
    return checked_out(manager) == 0


async def run_style(
    manager: DatabaseSessionManager,
    style: str,
    iterations: int,
    seed: int,
    dsn: str,
    application_name: str,
) -> StyleReport:
    """Run and cancel `iterations` units of work in `style`, then check every invariant.

    `manager` must be open on a database holding SCHEMA, with `application_name`.
    """
    rng = random.Random(f"{seed}:{style}")
    report = StyleReport(style=style, seed=seed, iterations=iterations)
    registry: dict[tuple[str, int], Iteration] = {}
    plans = [_plan(style, number, rng) for number in range(iterations)]
    release_after = [rng.uniform(0, 2 * OFFSET_MAX["checkout"]) for _ in plans]
    invalidations = Counter[str]()

    def on_invalidate(*_: Any) -> None:
        invalidations["invalidated"] += 1

    event.listen(manager.engine.sync_engine, "invalidate", on_invalidate)
    sampler = Sampler(dsn, application_name)
    sampling = asyncio.create_task(sampler.run())
    started = time.monotonic()
    try:
        with phase_probe(manager.engine), serving(manager):
            async with _front_end(style, registry) as send:
                for iteration, hold_for in zip(plans, release_after, strict=True):
                    registry[(style, iteration.number)] = iteration
                    if iteration.hold_pool:
                        async with _pool_held(manager.engine, hold_for):
                            await send(manager, iteration)
                    else:
                        await send(manager, iteration)
                    if checked_out(manager):
                        report.returned_early += 1
                    if not await _settled(manager, 1.0):
                        report.leaky_iterations += 1
                    _tally(report, iteration)
    finally:
        sampler.stop()
        await sampling
        event.remove(manager.engine.sync_engine, "invalidate", on_invalidate)
    report.seconds = time.monotonic() - started
    report.invalidated = invalidations["invalidated"]
    report.idle_in_transaction_max = sampler.max_idle_in_transaction
    report.backends_max = sampler.max_backends
    await _check_after(manager, report, dsn, application_name, plans)
    return report


def _tally(report: StyleReport, iteration: Iteration) -> None:
    outcome = iteration.outcome
    report.outcomes[outcome.split(":")[0]] += 1
    if outcome.startswith("error"):
        report.errors.append(f"iteration {iteration.number}: {outcome}")
    if iteration.landed is not None:
        report.landed[iteration.landed] += 1


Sender = Callable[[DatabaseSessionManager, Iteration], Any]


@contextlib.asynccontextmanager
async def _front_end(
    style: str, registry: dict[tuple[str, int], Iteration]
) -> AsyncIterator[Sender]:
    """How one iteration is started and cancelled in `style`."""
    if style in ("task", "anyio"):
        run = _run_task_style if style == "task" else _run_anyio_style

        async def direct(manager: DatabaseSessionManager, iteration: Iteration) -> None:
            await run(iteration, lambda: _direct_unit(manager, iteration))

        yield direct
    elif style in ("asgi-task", "asgi-anyio"):
        run = _run_task_style if style == "asgi-task" else _run_anyio_style
        transport = httpx.ASGITransport(app=pair_app(registry, base_middleware=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def asgi(_: DatabaseSessionManager, iteration: Iteration) -> None:
                await run(iteration, lambda: _asgi_request(client, iteration))

            yield asgi
    elif style in ("http", "http-basemw"):
        async with serve(pair_app(registry, base_middleware=style == "http-basemw")) as base:

            async def http(_: DatabaseSessionManager, iteration: Iteration) -> None:
                await _http_request(base, iteration)

            yield http
    else:
        raise ValueError(f"unknown style {style!r}: one of {', '.join(STYLES)}")


async def _check_after(
    manager: DatabaseSessionManager,
    report: StyleReport,
    dsn: str,
    application_name: str,
    plans: list[Iteration],
) -> None:
    observer = await asyncpg.connect(
        dsn, server_settings={"application_name": f"h2-cancel-observer-{os.getpid()}"}
    )
    try:
        # Quiescence: whatever cleanup is still running gets QUIESCENCE_SECONDS.
        deadline = time.monotonic() + QUIESCENCE_SECONDS
        while True:
            state = await server_state(observer, application_name)
            quiet = checked_out(manager) == 0 and not state.idle_in_transaction
            # A backend whose connection was invalidated exits only once its running
            # statement ends and it notices the closed socket: it may outlive a new
            # connection briefly, so the backend count is checked after quiescence.
            quiet = quiet and not state.locks and state.backends <= POOL_CAPACITY
            if quiet or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        report.leaked_connections = checked_out(manager)
        report.idle_in_transaction_after = state.idle_in_transaction
        report.locks_after = state.locks
        report.backends_after = state.backends
        report.backends_max = max(report.backends_max, state.backends)
        rows = await observer.fetch(
            f"SELECT iteration, count(*) AS parts FROM {TABLE} WHERE style = $1 GROUP BY 1",
            report.style,
        )
    finally:
        await observer.close()
    parts = {row["iteration"]: row["parts"] for row in rows}
    for iteration in plans:
        present = parts.get(iteration.number, 0)
        if present == 1:
            report.half_committed += 1
        elif present == 2 and iteration.fail:
            report.failed_but_committed += 1
        elif present == 2 and (iteration.outcome == "cancelled" or iteration.client_gone):
            report.late_commits += 1  # committed, but its caller never heard so
        elif present == 0 and iteration.outcome == "completed":
            report.lost += 1
    report.poisoned_after = await health_errors(manager)


async def health_errors(manager: DatabaseSessionManager) -> int:
    """Run HEALTH_UNITS units of work, as many at once as the pool holds; count failures.

    Concurrent, so that every pooled connection is used, not only the last one.
    """
    failures = 0

    async def unit() -> None:
        async with manager.session() as session:
            await session.execute(text("SELECT pg_sleep(0.001)"))

    for _ in range(HEALTH_UNITS // POOL_CAPACITY):
        results = await asyncio.gather(
            *(unit() for _ in range(POOL_CAPACITY)), return_exceptions=True
        )
        failures += sum(isinstance(result, BaseException) for result in results)
    return failures


# --- cancelled while queued for the pool (C-06) --------------------------------------


@dataclass
class QueueReport:
    """What 20 pool waiters, 15 of them cancelled, left behind."""

    cancelled: int
    served: int
    checked_out_after: int
    concurrent_after: int  # checkouts that then succeeded at the same time


async def cancel_queued_waiters(
    manager: DatabaseSessionManager, style: str, waiters: int = 20, cancelled: int = 15
) -> QueueReport:
    """Saturate the pool, queue `waiters` sessions, cancel `cancelled` of them, release.

    `style` is "task" (task.cancel) or "anyio" (each waiter in its own CancelScope).
    """
    engine = manager.engine
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    capacity = pool.size()
    release = asyncio.Event()
    held = asyncio.Semaphore(0)
    queueing = 0
    all_queueing = asyncio.Event()
    scopes: list[anyio.CancelScope] = []

    async def hold() -> None:
        async with engine.connect():
            held.release()
            await release.wait()

    async def wait_for_pool() -> bool:
        nonlocal queueing
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            async with manager.session() as session:
                queueing += 1
                if queueing == waiters:
                    all_queueing.set()
                await session.execute(text("SELECT 1"))  # the checkout waits here
        return scope.cancelled_caught

    holders = [asyncio.create_task(hold()) for _ in range(capacity)]
    for _ in range(capacity):
        await held.acquire()
    queued = [asyncio.create_task(wait_for_pool()) for _ in range(waiters)]
    await all_queueing.wait()
    await asyncio.sleep(0.02)  # a few loop turns: each one is now parked in the pool's queue
    for index in range(cancelled):
        if style == "task":
            queued[index].cancel()
        else:
            scopes[index].cancel()
    await asyncio.sleep(0.01)
    release.set()
    await asyncio.gather(*holders)
    await asyncio.wait(queued)
    errors = [task.exception() for task in queued if not task.cancelled() and task.exception()]
    if errors:
        raise AssertionError(f"queued sessions failed: {errors!r}")
    gone = sum(task.cancelled() or task.result() for task in queued)
    checked_out_after = pool.checkedout()
    # Every slot must be free again: `capacity` checkouts at once, within pool_timeout.
    everyone_in = asyncio.Event()
    inside = 0

    async def concurrently() -> None:
        nonlocal inside
        async with engine.connect():
            inside += 1
            if inside == capacity:
                everyone_in.set()
            await everyone_in.wait()

    await asyncio.gather(*(concurrently() for _ in range(capacity)))
    return QueueReport(gone, waiters - gone, checked_out_after, inside)


# --- noise ---------------------------------------------------------------------------


def noise_in(records: list[logging.LogRecord]) -> list[str]:
    """Log records that are warnings or errors, or that say something was abandoned."""
    found = []
    for record in records:
        message = record.getMessage()
        if record.levelno >= logging.WARNING or any(marker in message for marker in NOISE):
            found.append(f"{record.name} {record.levelname}: {message[:300]}")
    return found


def split_noise(lines: list[str]) -> tuple[list[str], int]:
    """The noise lines that break the promise, and how many were asyncpg's connect noise."""
    known = [line for line in lines if ASYNCPG_CONNECT_NOISE in line]
    return [line for line in lines if line not in known], len(known)


def collected_garbage_warnings() -> list[str]:
    """Warnings (ResourceWarning, SAWarning, ...) that a full garbage collection emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return [f"{w.category.__name__}: {w.message}" for w in caught]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def collecting_noise() -> Iterator[list[str]]:
    """For the soak: log records, warnings and unraisable exceptions, as `noise_in` lines.

    The list is filled when the block exits.
    """
    handler = _Records()
    loggers = [logging.getLogger(name) for name in NOISE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    unraisable: list[str] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(f"unraisable: {u.exc_value!r}")
    found: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        sys.unraisablehook = previous_hook
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    found += noise_in(handler.records)
    found += [f"{w.category.__name__}: {w.message}" for w in caught]
    found += unraisable


# --- soak entry point ----------------------------------------------------------------


async def create_schema(dsn: str) -> None:
    """Create the pairs table and its slow deferred trigger."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(SCHEMA)
    finally:
        await connection.close()


async def drop_schema(dsn: str) -> None:
    """Drop what `create_schema` made."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(DROP_SCHEMA)
    finally:
        await connection.close()


async def soak(server: URL, iterations: int, seed: int, styles: list[str]) -> int:
    """Run every style on a database of its own; print one line each; 1 if a promise broke."""
    url = server.set(database=f"h2_cancel_{os.getpid()}_{secrets.token_hex(3)}")
    application_name = f"h2-cancel-{os.getpid()}"
    dsn = asyncpg_dsn(url)
    broken = False
    await create_test_database(url)
    try:
        await create_schema(dsn)
        for style in styles:
            with collecting_noise() as noise:
                manager = open_manager(url, application_name)
                try:
                    report = await run_style(
                        manager, style, iterations, seed, dsn, application_name
                    )
                finally:
                    await manager.close()
                # Inside the collection: what the collector finds gets logged too.
                garbage = collected_garbage_warnings()
            report.noise, report.asyncpg_connect_noise = split_noise(noise + garbage)
            print(report.line(), flush=True)
            broken = _print_violations(report.violations()) or broken
    finally:
        # Anything abandoned late (found by a later collection, or at the drop).
        with collecting_noise() as trailing:
            await drop_test_database(url)
            garbage = collected_garbage_warnings()
    late, known = split_noise(trailing + garbage)
    print(f"[after all styles] warnings={len(late)} asyncpg_connect_noise={known}", flush=True)
    return 1 if _print_violations(late) or broken else 0


def _print_violations(violations: list[str]) -> bool:
    for violation in violations:
        print(f"  VIOLATION {violation}", flush=True)
    return bool(violations)


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tests.faults.cancellation")
    parser.add_argument("--iterations", type=int, default=1000, help="per style")
    parser.add_argument(
        "--url",
        default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
        help="the server to use; the run creates and drops a database h2_cancel_<pid>_<hex>",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--styles", default=",".join(STYLES), help="comma-separated")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    styles = [style for style in args.styles.split(",") if style]
    unknown = [style for style in styles if style not in STYLES]
    if unknown:
        parser.error(f"unknown style(s) {unknown}: choose from {', '.join(STYLES)}")
    return asyncio.run(soak(make_url(args.url), args.iterations, seed, styles))


if __name__ == "__main__":
    sys.exit(main())
