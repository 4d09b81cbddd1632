"""What the cancellation driver checks, and the figures it reports: the pool, the server's backends,
transactions and locks, the pairs written, and whether the pool still works afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy import text

from app.database import DatabaseSessionManager
from tests.faults.cancel_frontends import STYLES
from tests.faults.cancel_phases import EDGES, PHASES, Iteration
from tests.faults.cancel_workload import POOL_CAPACITY, TABLE
from tests.postgres import checked_out, count_backends

QUIESCENCE_SECONDS = 2.0
# Styles in which a cancellation delivered during a phase must end the unit of work
# as cancelled: one that completed or failed instead had it swallowed, and ran on.
# Not over ASGI with anyio: one landing in the ROLLBACK after the route raised often
# ends as that route's 409 instead (on either driver); the unit of work failed and
# rolled back all the same. Not over HTTP: nothing is cancelled there.
SURFACING_STYLES = ("task", "anyio", "asgi-task")
HEALTH_UNITS = 100
SAMPLE_SECONDS = 0.025


@dataclass
class ServerState:
    """The application's backends as PostgreSQL sees them."""

    backends: int
    idle_in_transaction: int
    locks: int


async def server_state(observer: Any, application_name: str) -> ServerState:
    """Count the backends of `application_name`, those idle in a transaction, their locks."""
    locks: int = await observer.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE a.application_name = $1",
        application_name,
    )
    return ServerState(
        backends=await count_backends(observer, application_name),
        idle_in_transaction=await count_backends(
            observer, application_name, state_like="idle in transaction%"
        ),
        locks=locks,
    )


async def connect_observer(dsn: str, role: str) -> Any:
    """A plain asyncpg connection, outside the pool under test, named `h2-cancel-<role>-<pid>`.

    Named so that it is never counted among the application's backends.
    """
    return await asyncpg.connect(
        dsn, server_settings={"application_name": f"h2-cancel-{role}-{os.getpid()}"}
    )


class Sampler:
    """Polls the server state while iterations run, keeping the maxima."""

    def __init__(self, dsn: str, application_name: str) -> None:
        self._dsn = dsn
        self._application_name = application_name
        self._stop = asyncio.Event()
        self.max_idle_in_transaction = 0
        self.max_backends = 0

    async def run(self) -> None:
        """Poll every SAMPLE_SECONDS until `stop()`."""
        observer = await connect_observer(self._dsn, "sampler")
        try:
            while not self._stop.is_set():
                state = await server_state(observer, self._application_name)
                self.max_idle_in_transaction = max(
                    self.max_idle_in_transaction, state.idle_in_transaction
                )
                self.max_backends = max(self.max_backends, state.backends)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), SAMPLE_SECONDS)
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
    # By phase: cancellations that landed, yet the unit of work completed or failed.
    swallowed: Counter[str] = field(default_factory=Counter)
    poisoned_after: int = 0
    invalidated: int = 0
    noise: list[str] = field(default_factory=list)
    asyncpg_connect_noise: int = 0
    seconds: float = 0.0

    def tally(self, iteration: Iteration) -> None:
        """Count how `iteration` ended and where its cancellation landed."""
        outcome = iteration.outcome
        self.outcomes[outcome.split(":")[0]] += 1
        if outcome.startswith("error"):
            self.errors.append(f"iteration {iteration.number}: {outcome}")
        if iteration.landed is not None:
            self.landed[iteration.landed] += 1
        ran_on = outcome in ("completed", "failed")
        if ran_on and iteration.landed in PHASES and self.style in SURFACING_STYLES:
            self.swallowed[iteration.landed] += 1

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
            "swallowed": sum(self.swallowed.values()),
            "poisoned_after": self.poisoned_after,
            "errors": len(self.errors),
            "warnings": len(self.noise),
        }
        found = [f"{name}={value}" for name, value in checks.items() if value]
        if self.swallowed:
            found.append(f"cancellations swallowed in {dict(self.swallowed)}")
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
            f"lost={self.lost} swallowed={sum(self.swallowed.values())} "
            f"poisoned_after={self.poisoned_after} "
            f"errors={len(self.errors)} warnings={len(self.noise)} "
            f"asyncpg_connect_noise={self.asyncpg_connect_noise} "
            f"invalidated={self.invalidated} {self.seconds:.1f}s | phases hit: {hit}"
        )


async def check_after(
    manager: DatabaseSessionManager,
    report: StyleReport,
    dsn: str,
    application_name: str,
    plans: list[Iteration],
) -> None:
    """Once the run is over: wait for quiescence, then fill in what was left behind."""
    observer = await connect_observer(dsn, "observer")
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
