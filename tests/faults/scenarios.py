"""Fault scenarios under write load: inject one fault, reconcile, report one line.

Shared by the fast tier (`test_no_lost_writes.py`, a few seconds each) and the
soak tier (`python -m tests.faults.soak`, about a minute each). The same run,
with a PgBouncer in transaction mode between the service and PostgreSQL, takes
the faults of `POOLER_FAULTS` (`test_pgbouncer_writes.py`, `soak --pgbouncer`),
and `run_load` drives several services sharing one PgBouncer, without a fault.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import asyncpg
import httpx

from tests.faults.loadgen import Outcome, Write, reconcile, write_until
from tests.faults.pgbouncer import PgBouncer, StopMode
from tests.faults.proxy import FaultProxy
from tests.faults.server import APP_ROLE, FaultServer
from tests.faults.service import Service, running_service

# Share of COMMITs the commit faults break while they are switched on.
COMMIT_FAULT_PROBABILITY = 0.05
QUIESCENCE_SECONDS = 5.0
# The reference service's pool waits this long for a connection (the package's default).
POOL_TIMEOUT_SECONDS = 5.0
# How long the PAUSE scenario holds PgBouncer paused at most: a short switchover,
# within the service's pool_timeout, so every request caught in it can still
# succeed once RESUME lets it through, and be answered within that timeout of it.
PAUSE_SECONDS = 3.0
PAUSE_SCENARIO = "pgbouncer PAUSE then RESUME"
# What the service needs to run behind a transaction-mode pooler.
POOLER_ENV = {"DATABASE_TRANSACTION_POOLER": "1"}
# PgBouncer's server connections in the fault scenarios: fewer than the service's
# pool of 15, so its connections share them as in production.
PGBOUNCER_POOL_SIZE = 5
# The load shape: 4 services of 20 connections each on 10 server connections.
LOAD_SERVICES = 4
LOAD_POOL_SIZE = 20
LOAD_PGBOUNCER_POOL_SIZE = 10


def _restart(mode: str) -> Callable[[FaultServer, FaultProxy, float], None]:
    def inject(server: FaultServer, _: FaultProxy, __: float) -> None:
        server.restart("fast" if mode == "fast" else "immediate")

    return inject


def _terminate_app_backends(server: FaultServer, _: FaultProxy, __: float) -> None:
    # Two statements: in one, the planner may call pg_terminate_backend before
    # filtering on the role, and kill every backend, this one included.
    killed = server.psql(
        f"SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE usename = '{APP_ROLE}'"
    )
    if not killed:
        return
    server.psql(f"SELECT pg_terminate_backend(pid) FROM unnest(ARRAY[{killed}]) AS pid")
    # Ready once every killed backend has exited and its socket is closed.
    while server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid IN ({killed})") != "0":
        time.sleep(0.01)


def _commit_fault(kind: str) -> Callable[[FaultServer, FaultProxy, float], None]:
    def inject(_: FaultServer, proxy: FaultProxy, window: float) -> None:
        def faulted() -> int:
            return proxy.commits.dropped + proxy.commits.acks_lost

        before = faulted()
        proxy.on_commit("drop" if kind == "drop" else "ack_lost", COMMIT_FAULT_PROBABILITY)
        time.sleep(window)
        # On a starved machine the window can pass without one COMMIT faulted (seen
        # once in a full `make test`: 263 requests in 4 s): keep it open a little
        # longer then, or the run would prove nothing.
        give_up = time.monotonic() + 4 * window
        while faulted() == before and time.monotonic() < give_up:
            time.sleep(0.01)
        proxy.on_commit(None)

    return inject


def _stall(_: FaultServer, proxy: FaultProxy, window: float) -> None:
    proxy.stall()
    time.sleep(window)
    proxy.restore()


def _cut(_: FaultServer, proxy: FaultProxy, __: float) -> None:
    proxy.cut()


# Each fault blocks until the database is ready again (or the injection window ends).
FAULTS: dict[str, Callable[[FaultServer, FaultProxy, float], None]] = {
    "fast restart": _restart("fast"),
    "crash restart": _restart("immediate"),
    "terminate all": _terminate_app_backends,
    "cut before COMMIT": _commit_fault("drop"),
    "ack lost after COMMIT": _commit_fault("ack_lost"),
    "network cut": _cut,
    "network stall": _stall,
}


# A fault on the path through PgBouncer: the proxy sits between the service and
# PgBouncer, which sits in front of the server.
PoolerFault = Callable[[FaultServer, FaultProxy, PgBouncer, float], None]


def _without_pgbouncer(fault: Callable[[FaultServer, FaultProxy, float], None]) -> PoolerFault:
    def inject(server: FaultServer, proxy: FaultProxy, _: PgBouncer, window: float) -> None:
        fault(server, proxy, window)

    return inject


def _pgbouncer_restart(mode: StopMode) -> PoolerFault:
    def inject(_: FaultServer, __: FaultProxy, pgbouncer: PgBouncer, ___: float) -> None:
        pgbouncer.restart(mode)

    return inject


def _server_restart_behind_pgbouncer(
    server: FaultServer, _: FaultProxy, pgbouncer: PgBouncer, __: float
) -> None:
    server.restart("fast")
    # A login PgBouncer tried while the server was down makes it refuse new clients
    # for server_login_retry: the path is ready once it serves a new client again.
    pgbouncer.wait_until_serving()


def _pgbouncer_reconnect(_: FaultServer, __: FaultProxy, pgbouncer: PgBouncer, ___: float) -> None:
    # Each server connection is closed as soon as it is released; new ones may be
    # opened at once, so there is nothing to wait for.
    pgbouncer.admin("RECONNECT")


def _pgbouncer_pause(_: FaultServer, __: FaultProxy, pgbouncer: PgBouncer, window: float) -> None:
    # PAUSE returns once every server connection is released; from then on PgBouncer
    # holds clients' queries (it does not refuse them) until RESUME.
    pgbouncer.admin("PAUSE")
    try:
        time.sleep(min(window, PAUSE_SECONDS))
    finally:
        pgbouncer.admin("RESUME")


# Each fault blocks until the path is ready again (or the injection window ends).
POOLER_FAULTS: dict[str, PoolerFault] = {
    "pgbouncer safe restart": _pgbouncer_restart("safe"),
    "pgbouncer immediate restart": _pgbouncer_restart("immediate"),
    "server fast restart behind pgbouncer": _server_restart_behind_pgbouncer,
    "pgbouncer RECONNECT": _pgbouncer_reconnect,
    PAUSE_SCENARIO: _pgbouncer_pause,
    "cut before COMMIT to pgbouncer": _without_pgbouncer(_commit_fault("drop")),
    "ack lost after COMMIT via pgbouncer": _without_pgbouncer(_commit_fault("ack_lost")),
}
# The scenarios whose proxy breaks COMMITs: before forwarding them, or after.
COMMIT_DROP_SCENARIOS = ("cut before COMMIT", "cut before COMMIT to pgbouncer")
ACK_LOST_SCENARIOS = ("ack lost after COMMIT", "ack lost after COMMIT via pgbouncer")


@dataclass(frozen=True)
class Figures:
    """What one scenario run measured."""

    scenario: str
    clients: int
    seconds: float
    outcome: Outcome
    fault_seconds: float  # from injecting the fault until the database was ready again
    failed_after_ready: int  # writes sent after that which were not acknowledged
    recovery_seconds: float | None  # from ready until the first acknowledged write
    slowest_seconds: float  # the longest any request waited for its answer
    transport_error_kinds: str  # " (RemoteProtocolError:1)", or "" if none: for the figure line
    commits_dropped: int
    acks_lost: int
    checked_out_after: int
    idle_in_transaction_after: int
    backends_after: int
    # From ready until the last answer to a write sent before it (<= 0: all answered
    # before ready): how long requests caught in the fault waited past its end.
    last_answer_after_ready: float = 0.0

    def line(self) -> str:
        """One line of figures, as the soak tier prints it."""
        o = self.outcome
        recovery = "n/a" if self.recovery_seconds is None else f"{self.recovery_seconds:.3f}s"
        return (
            f"[{self.scenario}] {self.clients} clients, {self.seconds:.0f}s | "
            f"requests={o.requests} 2xx={o.acknowledged} non-2xx={o.refused} "
            f"transport_err={o.transport_errors}{self.transport_error_kinds} | "
            f"LOST={o.lost} AMBIGUOUS={o.ambiguous} "
            f"PHANTOM={o.phantom} | fault={self.fault_seconds:.2f}s "
            f"failed_after_ready={self.failed_after_ready} recovery={recovery} "
            f"slowest={self.slowest_seconds:.2f}s "
            f"last_answer_after_ready={self.last_answer_after_ready:+.2f}s | "
            f"commits dropped={self.commits_dropped} acks_lost={self.acks_lost} | "
            f"after: checked_out={self.checked_out_after} "
            f"idle_in_txn={self.idle_in_transaction_after} backends={self.backends_after}"
        )


async def run_scenario(
    scenario: str,
    server: FaultServer,
    proxy: FaultProxy,
    base_url: str,
    *,
    clients: int,
    seconds: float,
    fault_at: float,
    pgbouncer: PgBouncer | None = None,
) -> Figures:
    """Write from `clients` clients for `seconds`, inject `scenario` at `fault_at`.

    With `pgbouncer`, `scenario` names one of `POOLER_FAULTS`, and `proxy` is the
    one between the service and that PgBouncer.
    """
    await _truncate_items(server)
    stop = asyncio.Event()
    started = time.monotonic()
    load = asyncio.create_task(write_until(base_url, clients, stop))
    await asyncio.sleep(fault_at)
    injected = time.monotonic()
    window = max(seconds / 4, 1.0)  # how long a switched-on fault stays on
    if pgbouncer is None:
        await asyncio.to_thread(FAULTS[scenario], server, proxy, window)
    else:
        await asyncio.to_thread(POOLER_FAULTS[scenario], server, proxy, pgbouncer, window)
    ready = time.monotonic()
    await asyncio.sleep(max(0.0, seconds - (ready - started)))
    stop.set()
    writes = await load
    checked_out = await _checked_out_when_quiet(base_url)
    stored, idle_in_transaction, backends = await _stored_and_server_view(server)
    return Figures(
        scenario=scenario,
        clients=clients,
        seconds=seconds,
        outcome=reconcile(writes, stored),
        fault_seconds=ready - injected,
        failed_after_ready=sum(w.sent > ready and not w.acknowledged for w in writes),
        recovery_seconds=_recovery(writes, ready),
        slowest_seconds=max((w.received - w.sent for w in writes), default=0.0),
        transport_error_kinds=_kinds(writes),
        commits_dropped=proxy.commits.dropped,
        acks_lost=proxy.commits.acks_lost,
        checked_out_after=checked_out,
        idle_in_transaction_after=idle_in_transaction,
        backends_after=backends,
        last_answer_after_ready=_last_answer_after(writes, ready),
    )


def _kinds(writes: list[Write]) -> str:
    kinds = Counter(w.transport_error for w in writes if w.transport_error)
    return f" ({', '.join(f'{k}:{n}' for k, n in kinds.items())})" if kinds else ""


def _last_answer_after(writes: list[Write], ready: float) -> float:
    caught = [w.received for w in writes if w.sent <= ready]
    return max(caught, default=ready) - ready


def _recovery(writes: list[Write], ready: float) -> float | None:
    acknowledged = [w.received for w in writes if w.acknowledged and w.received > ready]
    return min(acknowledged) - ready if acknowledged else None


async def _checked_out_when_quiet(base_url: str) -> int:
    """The service pool's checked-out count once it settles (its /health reports it)."""
    deadline = time.monotonic() + QUIESCENCE_SECONDS
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
        while True:
            response = await client.get("/health")  # answered after its round trip ended
            response.raise_for_status()
            checked_out = int(response.json()["pool"]["checkedout"])
            if checked_out == 0 or time.monotonic() > deadline:
                return checked_out
            await asyncio.sleep(0.05)


async def _truncate_items(server: FaultServer) -> None:
    # The observer connects afresh each time: the fault may kill its connections too.
    observer = await asyncpg.connect(server.superuser_dsn())
    try:
        await observer.execute("TRUNCATE items")
    finally:
        await observer.close()


async def _stored_and_server_view(server: FaultServer) -> tuple[set[str], int, int]:
    """The names stored, and the app's backends idle in a transaction and in all."""
    observer = await asyncpg.connect(server.superuser_dsn())
    try:
        stored = {row["name"] for row in await observer.fetch("SELECT name FROM items")}
        idle_in_transaction, backends = await _server_view(observer)
    finally:
        await observer.close()
    return stored, idle_in_transaction, backends


async def _server_view(observer: asyncpg.Connection) -> tuple[int, int]:
    """The app's backends idle in a transaction, and all of its backends."""
    row = await observer.fetchrow(
        "SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_txn,"
        " count(*) AS backends FROM pg_stat_activity WHERE usename = $1",
        APP_ROLE,
    )
    assert row is not None
    return int(row["idle_in_txn"]), int(row["backends"])


@dataclass(frozen=True)
class LoadFigures:
    """What a run of several services sharing one PgBouncer measured."""

    services: int
    pool_size: int  # each service's
    pgbouncer_pool_size: int
    clients: int
    seconds: float
    outcome: Outcome
    transport_error_kinds: str
    slowest_seconds: float
    checked_out_after: int  # summed over the services
    idle_in_transaction_after: int
    backends_after: int

    def line(self) -> str:
        """One line of figures, as the soak tier prints it."""
        o = self.outcome
        return (
            f"[pgbouncer load] {self.services} services x pool {self.pool_size} -> "
            f"pgbouncer pool {self.pgbouncer_pool_size}, {self.clients} clients, "
            f"{self.seconds:.0f}s | requests={o.requests} ({o.requests / self.seconds:.0f}/s) "
            f"2xx={o.acknowledged} non-2xx={o.refused} "
            f"transport_err={o.transport_errors}{self.transport_error_kinds} | "
            f"LOST={o.lost} AMBIGUOUS={o.ambiguous} PHANTOM={o.phantom} | "
            f"slowest={self.slowest_seconds:.2f}s | after: checked_out={self.checked_out_after} "
            f"idle_in_txn={self.idle_in_transaction_after} backends={self.backends_after}"
        )


@asynccontextmanager
async def running_services(
    pgbouncer: PgBouncer, count: int, env: Mapping[str, str]
) -> AsyncIterator[list[Service]]:
    """`count` reference services, each in its own uvicorn process, all on `pgbouncer`."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                running_service(pgbouncer.app_url(), env={**POOLER_ENV, **env})
            )
            for _ in range(count)
        ]


async def run_load(
    server: FaultServer,
    pgbouncer: PgBouncer,
    services: list[Service],
    *,
    pool_size: int,
    clients: int,
    seconds: float,
) -> LoadFigures:
    """Write from `clients` clients, spread over `services`, for `seconds`; no fault."""
    await _truncate_items(server)
    stop = asyncio.Event()
    shares = [
        clients // len(services) + (i < clients % len(services)) for i in range(len(services))
    ]
    load = asyncio.gather(
        *(write_until(s.base_url, n, stop) for s, n in zip(services, shares, strict=True))
    )
    await asyncio.sleep(seconds)
    stop.set()
    writes = [write for per_service in await load for write in per_service]
    checked_out = sum([await _checked_out_when_quiet(s.base_url) for s in services])
    stored, idle_in_transaction, backends = await _stored_and_server_view(server)
    return LoadFigures(
        services=len(services),
        pool_size=pool_size,
        pgbouncer_pool_size=pgbouncer.pool_size,
        clients=clients,
        seconds=seconds,
        outcome=reconcile(writes, stored),
        transport_error_kinds=_kinds(writes),
        slowest_seconds=max((w.received - w.sent for w in writes), default=0.0),
        checked_out_after=checked_out,
        idle_in_transaction_after=idle_in_transaction,
        backends_after=backends,
    )
