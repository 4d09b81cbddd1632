"""transaction_pooler=True behind a real PgBouncer in transaction mode (5 server connections).

Runs on the driver under test (TEST_DRIVER). What the pooler changes: prepared
statements must not outlive their transaction, session-level statements are
refused, and a cut connection's CancelRequest must go out while PgBouncer still
holds the client's connection.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from sqlalchemy import text

from app.database import DatabaseSessionManager, TransactionPoolerError
from tests.faults.pgbouncer import PgBouncer
from tests.faults.server import APP_ROLE, FaultServer

WORKERS = 20
# 1,000 units in the fast tier; POOLER_UNITS_PER_WORKER=500 for the 10,000 in the README.
UNITS_PER_WORKER = int(os.environ.get("POOLER_UNITS_PER_WORKER", "50"))
# Two parameterised statements per unit: what makes drivers prepare them.
STATEMENTS = (
    "SELECT count(*) FROM items WHERE name = :name",
    "SELECT :number + 1",
)


@pytest.fixture(name="observer")
async def observer_fixture(fault_server: FaultServer) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection straight to the server, past PgBouncer."""
    connection = await asyncpg.connect(fault_server.superuser_dsn())
    yield connection
    await connection.close()


@pytest.fixture(name="manager")
async def manager_fixture(pgbouncer: PgBouncer) -> AsyncIterator[DatabaseSessionManager]:
    """A manager of the test's own; closed (without grace) after it."""
    if not pgbouncer.is_running():
        pgbouncer.start()
    manager = DatabaseSessionManager()
    yield manager
    await manager.close(grace=0)


async def _units(manager: DatabaseSessionManager, workers: int, units: int) -> list[BaseException]:
    """Run `workers` x `units` units of work concurrently; the failures, in order."""
    failures: list[BaseException] = []

    async def worker(number: int) -> None:
        for unit in range(units):
            try:
                async with manager.session() as db:
                    await db.execute(text(STATEMENTS[0]), {"name": f"w{number}-{unit}"})
                    await db.execute(text(STATEMENTS[1]), {"number": unit})
            except Exception as error:  # counted, not raised: the test reports them all
                failures.append(error)

    await asyncio.gather(*(worker(n) for n in range(workers)))
    return failures


def _pooler_url(pgbouncer: PgBouncer) -> str:
    return pgbouncer.app_url().render_as_string(hide_password=False)


async def test_without_pooler_mode_the_first_clash_names_the_option(
    manager: DatabaseSessionManager, pgbouncer: PgBouncer
) -> None:
    """Prepared statements clash through the pooler; the error names transaction_pooler=True."""
    manager.init(_pooler_url(pgbouncer), pool_size=WORKERS, max_overflow=0)

    failures = await _units(manager, WORKERS, 10)

    assert failures, "no clash: the test did not go through a transaction pooler"
    kinds = {type(error).__name__ for error in failures}
    assert kinds == {"TransactionPoolerError"}, failures[:3]
    assert "transaction_pooler=True" in str(failures[0])


async def test_pooler_mode_runs_every_unit_and_prepares_nothing_that_stays(
    manager: DatabaseSessionManager, pgbouncer: PgBouncer
) -> None:
    """20 workers x 50 units: none fails, and no prepared statement stays on the server."""
    manager.init(_pooler_url(pgbouncer), transaction_pooler=True, pool_size=WORKERS, max_overflow=0)
    pgbouncer.close_server_connections()  # fresh server connections: none prepared yet

    failures = await _units(manager, WORKERS, UNITS_PER_WORKER)
    after = await _prepared_statements_per_server_connection(manager)

    assert failures == []
    print(f"{WORKERS * UNITS_PER_WORKER} units; prepared statements per server connection: {after}")
    assert len(after) == 5, f"sampled {len(after)} of PgBouncer's 5 server connections"
    assert set(after.values()) == {0}, after


async def _prepared_statements_per_server_connection(
    manager: DatabaseSessionManager,
) -> dict[int, int]:
    """pg_prepared_statements on every server connection PgBouncer holds (5 at once reach all)."""
    counts: dict[int, int] = {}

    async def sample() -> None:
        async with manager.session() as db:
            row = (
                await db.execute(
                    text(
                        "SELECT pg_backend_pid() AS pid, (SELECT count(*) FROM "
                        "pg_prepared_statements) AS n FROM pg_sleep(0.2)"
                    )
                )
            ).one()
            counts[row.pid] = row.n

    await asyncio.gather(*(sample() for _ in range(5)))
    return counts


@pytest.mark.parametrize(
    ("statement", "alternative"),
    [
        ("SET search_path TO pg_catalog", "SET LOCAL"),
        ("SELECT pg_advisory_lock(42)", "pg_advisory_xact_lock()"),
        ("CREATE TEMP TABLE scratch (x int)", "ON COMMIT DROP"),
    ],
)
async def test_session_level_statement_is_refused_before_it_is_sent(
    manager: DatabaseSessionManager, pgbouncer: PgBouncer, statement: str, alternative: str
) -> None:
    """The refusal names the alternative; the transaction is untouched and still commits."""
    manager.init(_pooler_url(pgbouncer), transaction_pooler=True)

    async with manager.session() as db:
        with pytest.raises(TransactionPoolerError, match=alternative):
            await db.execute(text(statement))
        # Had the statement reached the server, the transaction would be aborted or changed.
        assert await db.scalar(text("SHOW search_path")) == '"$user", public'
        assert (
            await db.scalar(text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")) == 0
        )


async def test_transaction_scoped_forms_work_through_the_pooler(
    manager: DatabaseSessionManager, pgbouncer: PgBouncer
) -> None:
    """SET LOCAL, transaction advisory locks, ON COMMIT DROP temp tables and cursors all run."""
    manager.init(_pooler_url(pgbouncer), transaction_pooler=True)

    async with manager.session() as db:
        await db.execute(text("SET LOCAL search_path TO pg_catalog, public"))
        await db.execute(text("SELECT pg_advisory_xact_lock(42)"))
        await db.execute(text("CREATE TEMP TABLE scratch (x int) ON COMMIT DROP"))
        await db.execute(text("INSERT INTO scratch VALUES (1)"))
        await db.execute(text("DECLARE c CURSOR FOR SELECT x FROM scratch"))
        assert (await db.execute(text("FETCH 1 FROM c"))).scalar_one() == 1
        assert await db.scalar(text("SHOW search_path")) == "pg_catalog, public"
    async with manager.session() as db:
        assert await db.scalar(text("SHOW search_path")) == '"$user", public'


async def test_a_cut_unit_of_work_stops_on_the_server_through_the_pooler(
    manager: DatabaseSessionManager, pgbouncer: PgBouncer, observer: asyncpg.Connection
) -> None:
    """close() after its grace cuts a pg_sleep(20): the backend stops it (CancelRequest first)."""
    manager.init(_pooler_url(pgbouncer), transaction_pooler=True)

    async def sleeper() -> None:
        async with manager.session() as db:
            await db.execute(text("SELECT pg_sleep(20) -- pooler cancel"))

    task = asyncio.create_task(sleeper())
    await _until(observer, running=1)
    await manager.close(grace=0.1)
    with pytest.raises(Exception):  # noqa: B017, PT011 - cut: whichever error the driver raises
        await task
    started = time.monotonic()
    await _until(observer, running=0)
    print(f"backend stopped {time.monotonic() - started:.3f} s after close() returned")


async def _until(observer: asyncpg.Connection, *, running: int, within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while True:
        count = await observer.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND state = 'active'"
            " AND query LIKE '%pooler cancel%'",
            APP_ROLE,
        )
        if count == running:
            return
        assert time.monotonic() < deadline, f"{count} backends running pg_sleep, expected {running}"
        await asyncio.sleep(0.02)


async def test_connections_pgbouncer_dropped_are_replaced_without_a_failed_unit(
    manager: DatabaseSessionManager, pgbouncer: PgBouncer
) -> None:
    """PgBouncer restarted: the liveness check discards its dead client connections at checkout."""
    manager.init(_pooler_url(pgbouncer), transaction_pooler=True, pool_size=3, max_overflow=0)
    assert await _units(manager, 3, 2) == []

    # In a thread, so that the event loop sees the connections close meanwhile.
    await asyncio.to_thread(pgbouncer.restart, "immediate")

    assert await _units(manager, 3, 5) == []
