"""Fault scenarios under write load: inject one fault, reconcile, report one line.

Shared by the fast tier (`test_no_lost_writes.py`, a few seconds each) and the
soak tier (`python -m tests.faults.soak`, about a minute each).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import httpx

from tests.faults.loadgen import Outcome, Write, reconcile, write_until
from tests.faults.proxy import FaultProxy
from tests.faults.server import APP_ROLE, FaultServer

# Share of COMMITs the commit faults break while they are switched on.
COMMIT_FAULT_PROBABILITY = 0.05
QUIESCENCE_SECONDS = 5.0


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
        proxy.on_commit("drop" if kind == "drop" else "ack_lost", COMMIT_FAULT_PROBABILITY)
        time.sleep(window)
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
            f"slowest={self.slowest_seconds:.2f}s | "
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
) -> Figures:
    """Write from `clients` clients for `seconds`, inject `scenario` at `fault_at`."""
    # The observer connects afresh each time: the fault may kill its connections too.
    observer = await asyncpg.connect(server.superuser_dsn())
    try:
        await observer.execute("TRUNCATE items")
    finally:
        await observer.close()
    stop = asyncio.Event()
    started = time.monotonic()
    load = asyncio.create_task(write_until(base_url, clients, stop))
    await asyncio.sleep(fault_at)
    injected = time.monotonic()
    window = max(seconds / 4, 1.0)  # how long a switched-on fault stays on
    await asyncio.to_thread(FAULTS[scenario], server, proxy, window)
    ready = time.monotonic()
    await asyncio.sleep(max(0.0, seconds - (ready - started)))
    stop.set()
    writes = await load
    checked_out = await _checked_out_when_quiet(base_url)
    observer = await asyncpg.connect(server.superuser_dsn())
    try:
        stored = {row["name"] for row in await observer.fetch("SELECT name FROM items")}
        idle_in_transaction, backends = await _server_view(observer)
    finally:
        await observer.close()
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
    )


def _kinds(writes: list[Write]) -> str:
    kinds = Counter(w.transport_error for w in writes if w.transport_error)
    return f" ({', '.join(f'{k}:{n}' for k, n in kinds.items())})" if kinds else ""


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


async def _server_view(observer: asyncpg.Connection) -> tuple[int, int]:
    """The app's backends idle in a transaction, and all of its backends."""
    row = await observer.fetchrow(
        "SELECT count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_in_txn,"
        " count(*) AS backends FROM pg_stat_activity WHERE usename = $1",
        APP_ROLE,
    )
    assert row is not None
    return int(row["idle_in_txn"]), int(row["backends"])
