"""Reads on a real streaming replica: read-your-writes, lag, and a replica that fails.

The primary is the private fault cluster, the replica a hot standby of it
(`pg_basebackup -R`), reached through a fault proxy that can stall or refuse.
Each read reports, in the same statement, whether it ran on the standby
(`pg_is_in_recovery()`), so a test can tell a read that went to the primary from
one that reached the replica.
"""

from __future__ import annotations

import asyncio
import contextvars
import random
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool

from app.database import (
    DatabaseConfigError,
    DatabaseErrorKind,
    DatabaseSessionManager,
    ReadSessionDep,
    ReadYourWritesMiddleware,
    _fastapi,
    classify_error,
)
from app.models import Item
from tests.faults.proxy import FaultProxy
from tests.faults.replica import ReplicaServer
from tests.faults.server import CANARY_PASSWORD, FaultServer
from tests.faults.service import running_service

T = TypeVar("T")
TABLE = "replica_reads"
# One statement: the row's presence and where it was read.
READ = text(
    f"SELECT (SELECT count(*) FROM {TABLE} WHERE key = :key) = 1, pg_catalog.pg_is_in_recovery()"
)
# Where a statement of a unit ran: True on the standby.
IN_RECOVERY = text("SELECT pg_catalog.pg_is_in_recovery()")
WRITERS = 50
# Generous: a read waits at most a probe timeout plus a connect or pool timeout (5 s
# each) before it moves to the primary; a hang would take the statement timeout, 30 s.
BOUNDED_SECONDS = 15.0


@pytest.fixture(name="manager")
async def manager_fixture(
    fault_server: FaultServer,
    replica_server: ReplicaServer,
    replica_proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[DatabaseSessionManager]:
    """A manager on the primary with the replica behind the proxy; the table on both."""
    # 50 writers on 15 connections, on a busy machine: these tests are about stale
    # reads, not about a pool's wait.
    async with _replicated(
        fault_server, replica_server, replica_proxy, max_replica_lag=2.0, pool_timeout=30
    ) as manager:
        monkeypatch.setattr(_fastapi, "session_manager", manager)
        yield manager


@asynccontextmanager
async def _replicated(
    fault_server: FaultServer,
    replica_server: ReplicaServer,
    replica_proxy: FaultProxy,
    **options: Any,
) -> AsyncIterator[DatabaseSessionManager]:
    """An open manager on the primary and the proxied replica, the table on both."""
    manager = DatabaseSessionManager()
    manager.init(
        fault_server.app_url(),
        replica_urls=[replica_server.app_url(port=replica_proxy.port)],
        **options,
    )
    try:
        async with manager.session() as session:
            await session.execute(
                text(f"CREATE TABLE IF NOT EXISTS {TABLE} (key text PRIMARY KEY)")
            )
        await asyncio.to_thread(replica_server.wait_caught_up)
        await manager.verify_replicas()
        yield manager
    finally:
        await manager.close()


async def _read(manager: DatabaseSessionManager, key: str = "") -> tuple[bool, bool]:
    async with manager.session(read_only=True) as session:
        found, on_replica = (await session.execute(READ, {"key": key})).one()
    return bool(found), bool(on_replica)


async def _write(manager: DatabaseSessionManager) -> None:
    async with manager.session() as session:
        await session.execute(text(f"INSERT INTO {TABLE} VALUES (:key)"), {"key": uuid.uuid4().hex})


async def _until_replica_used(manager: DatabaseSessionManager, timeout: float = 10.0) -> float:
    """Seconds until a plain read reaches the replica again."""
    started = time.monotonic()
    while not (await _read(manager))[1]:
        if time.monotonic() - started > timeout:
            raise AssertionError(f"the replica was not used again within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_reads_go_to_the_replica_and_writes_to_the_primary(
    manager: DatabaseSessionManager,
) -> None:
    await _until_replica_used(manager, timeout=5)
    async with manager.session() as session:
        assert await session.scalar(IN_RECOVERY) is False
    [status] = manager.replica_status()
    assert status["in_use"] is True
    assert CANARY_PASSWORD not in repr(manager.replica_status())


async def test_a_replica_url_naming_a_primary_is_refused_before_traffic(
    fault_server: FaultServer,
) -> None:
    manager = DatabaseSessionManager()
    manager.init(fault_server.app_url(), replica_urls=[fault_server.app_url()])
    try:
        with pytest.raises(DatabaseConfigError, match="not a standby") as refused:
            await manager.verify_replicas()
        assert f"127.0.0.1:{fault_server.port}/faults" in str(refused.value)
        assert CANARY_PASSWORD not in str(refused.value)
        # Never used: reads run on the primary, which it is.
        async with manager.session(read_only=True) as session:
            assert await session.scalar(text("SELECT 1")) == 1
        assert manager.replica_status()[0]["in_use"] is False
    finally:
        await manager.close()


@dataclass
class Tally:
    stale: list[str] = field(default_factory=list)
    on_replica: int = 0
    on_primary: int = 0

    def record(self, key: str, found: bool, on_replica: bool) -> None:
        if not found:
            self.stale.append(key)
        if on_replica:
            self.on_replica += 1
        else:
            self.on_primary += 1


def _writes_app(manager: DatabaseSessionManager, tally: Tally) -> FastAPI:
    app = FastAPI()

    @app.post("/rows/{key}")
    async def write_then_read(key: str) -> None:
        async with manager.session() as session:
            await session.execute(text(f"INSERT INTO {TABLE} VALUES (:key)"), {"key": key})
        tally.record(key, *await _read(manager, key))  # the same request

    @app.get("/rows/{key}")
    async def read(key: str, db: ReadSessionDep) -> None:
        found, on_replica = (await db.execute(READ, {"key": key})).one()
        tally.record(key, bool(found), bool(on_replica))

    app.add_middleware(ReadYourWritesMiddleware)  # the cookie follows init(): 2 + 2.5 s
    return app


async def _pause_and_resume_at_random(replica: ReplicaServer, stop: asyncio.Event) -> int:
    pauses = 0
    rng = random.Random(10)
    while not stop.is_set():
        await asyncio.to_thread(replica.pause_replay)
        pauses += 1
        await asyncio.sleep(rng.uniform(0.05, 0.4))
        await asyncio.to_thread(replica.resume_replay)
        await asyncio.sleep(rng.uniform(0.0, 0.2))
    return pauses


async def test_no_stale_read_after_a_write_while_replay_pauses_and_resumes(
    manager: DatabaseSessionManager, replica_server: ReplicaServer
) -> None:
    """50 writers read their row back in the same request and, with the cookie, in the next."""
    tally = Tally()
    app = _writes_app(manager, tally)
    transport = httpx.ASGITransport(app=app)
    run = uuid.uuid4().hex[:8]

    async def writer(number: int, client: httpx.AsyncClient) -> None:
        for round_ in range(3):
            key = f"{run}-{number}-{round_}"
            (await client.post(f"/rows/{key}")).raise_for_status()
            assert client.cookies.get("db_position"), "the write's position was not sent"
            (await client.get(f"/rows/{key}")).raise_for_status()  # its next request

    stop = asyncio.Event()
    pauser = asyncio.create_task(_pause_and_resume_at_random(replica_server, stop))
    clients = [
        httpx.AsyncClient(transport=transport, base_url="http://test") for _ in range(WRITERS)
    ]
    try:
        await asyncio.gather(*(writer(number, client) for number, client in enumerate(clients)))
        stop.set()
        pauses = await pauser
        await asyncio.to_thread(replica_server.wait_caught_up)
        # Caught up: the same clients' reads, cookie and all, now reach the replica.
        caught_up = Tally()
        tally_during = tally
        app_after = _writes_app(manager, caught_up)
        transport.app = app_after
        for number, client in enumerate(clients):
            (await client.get(f"/rows/{run}-{number}-2")).raise_for_status()
    finally:
        stop.set()
        await asyncio.gather(pauser, return_exceptions=True)
        await asyncio.to_thread(replica_server.resume_replay)
        for client in clients:
            await client.aclose()

    assert pauses > 0
    assert tally_during.stale == [], f"{len(tally_during.stale)} stale reads"
    assert tally_during.on_replica + tally_during.on_primary == 2 * 3 * WRITERS
    assert caught_up.stale == []
    # Not bypassed: once it has replayed the writes, the replica serves them.
    assert caught_up.on_replica >= 0.8 * WRITERS, caught_up
    print(
        f"\nread-your-writes: {pauses} pauses; during them {tally_during.on_replica} reads on "
        f"the replica, {tally_during.on_primary} on the primary; caught up: "
        f"{caught_up.on_replica}/{WRITERS} on the replica"
    )


async def test_a_replica_lagging_past_max_replica_lag_is_set_aside_then_used_again(
    manager: DatabaseSessionManager, replica_server: ReplicaServer
) -> None:
    await _until_replica_used(manager)
    await asyncio.to_thread(replica_server.pause_replay)
    try:
        # Writes keep the primary's WAL moving away from the paused replay; each in a
        # task with a context of its own, so that this task's reads are not sent to the
        # primary by read-your-writes: only the lag may set the replica aside here.
        deadline = time.monotonic() + 10
        while (await _read(manager))[1]:
            await contextvars.Context().run(asyncio.create_task, _write(manager))
            assert time.monotonic() < deadline, "a replica lagging > 2 s was still used"
            await asyncio.sleep(0.1)
        assert manager.replica_status()[0]["lag_seconds"] > 2.0
    finally:
        await asyncio.to_thread(replica_server.resume_replay)
    await _until_replica_used(manager)


@dataclass
class Readers:
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    on_replica: int = 0


async def _read_load(
    manager: DatabaseSessionManager, readers: Readers, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        started = time.monotonic()
        try:
            _, on_replica = await _read(manager)
        except Exception as error:  # counted: the test fails on any
            readers.failures.append(f"{type(error).__name__}: {error}")
        else:
            readers.on_replica += on_replica
        readers.latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.01)


async def test_a_replica_stalled_stopped_refusing_or_cut_fails_no_read_while_the_primary_is_up(
    manager: DatabaseSessionManager, replica_server: ReplicaServer, replica_proxy: FaultProxy
) -> None:
    await _until_replica_used(manager)
    readers, stop = Readers(), asyncio.Event()
    load = [asyncio.create_task(_read_load(manager, readers, stop)) for _ in range(8)]
    recovered: dict[str, float] = {}
    try:
        await asyncio.sleep(0.3)
        replica_proxy.stall()  # statements in flight hang on the replica
        await asyncio.sleep(3.0)
        replica_proxy.restore()
        recovered["stall"] = await _until_replica_used(manager)

        await asyncio.to_thread(replica_server.stop, "fast")
        await asyncio.sleep(1.5)
        await asyncio.to_thread(replica_server.start)
        recovered["stop"] = await _until_replica_used(manager)

        replica_proxy.refuse()
        replica_proxy.cut()
        await asyncio.sleep(1.5)
        replica_proxy.restore()
        recovered["refuse"] = await _until_replica_used(manager)

        killed = replica_server.psql(
            "SELECT count(pg_catalog.pg_terminate_backend(pid)) FROM pg_catalog.pg_stat_activity "
            "WHERE usename = 'app'"
        )
        assert int(killed) > 0
        await asyncio.sleep(1.0)
        recovered["terminate"] = await _until_replica_used(manager)
    finally:
        stop.set()
        await asyncio.gather(*load)
        replica_proxy.restore()
    assert readers.failures == [], readers.failures[:5]
    assert max(readers.latencies) < BOUNDED_SECONDS, max(readers.latencies)
    assert readers.on_replica > 0
    print(
        f"\n{len(readers.latencies)} reads, 0 failed, slowest {max(readers.latencies):.2f} s, "
        f"{readers.on_replica} on the replica; back in use after: "
        + ", ".join(f"{fault} {seconds:.2f} s" for fault, seconds in recovered.items())
    )


async def test_the_reference_service_reads_its_clients_writes_from_a_paused_replica(
    fault_server: FaultServer, replica_server: ReplicaServer
) -> None:
    """Under uvicorn, DATABASE_REPLICA_URLS set: a client's GET after its POST finds the item."""
    replica_url = replica_server.app_url().render_as_string(hide_password=False)
    async with (
        running_service(
            fault_server.app_url(), env={"DATABASE_REPLICA_URLS": replica_url}
        ) as service,
        httpx.AsyncClient(base_url=service.base_url, timeout=10) as client,
    ):
        health = (await client.get("/health")).json()
        assert [replica["replica"] for replica in health["replicas"]] == [
            f"127.0.0.1:{replica_server.port}/faults"
        ]
        await asyncio.to_thread(replica_server.pause_replay)
        try:
            created = await client.post("/items", json={"name": f"paused-{uuid.uuid4().hex}"})
            assert created.status_code == 201, created.text
            item_id = created.json()["id"]
            assert "db_position" in client.cookies
            # The replica has not replayed it: the GET must go to the primary.
            found = await client.get(f"/items/{item_id}")
            assert found.status_code == 200, found.text
        finally:
            await asyncio.to_thread(replica_server.resume_replay)
    assert CANARY_PASSWORD not in service.stdout + service.stderr


def _in_own_context(work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A task with an empty context: its writes raise no floor of this test's reads."""
    return contextvars.Context().run(asyncio.create_task, work)


@pytest.fixture(name="small_manager")
async def small_manager_fixture(
    fault_server: FaultServer, replica_server: ReplicaServer, replica_proxy: FaultProxy
) -> AsyncIterator[DatabaseSessionManager]:
    """Two connections per server and a 1 s max_replica_lag: easy to saturate and to outrun."""
    async with _replicated(
        fault_server, replica_server, replica_proxy, max_replica_lag=1.0, pool_size=2
    ) as manager:
        yield manager


async def test_a_replica_too_busy_to_be_probed_is_not_trusted_past_max_replica_lag(
    small_manager: DatabaseSessionManager, replica_server: ReplicaServer
) -> None:
    """Its pool always full, its lag unmeasured: after max_replica_lag reads leave it."""
    manager = small_manager
    await _until_replica_used(manager)
    stop = asyncio.Event()

    async def hog() -> None:
        while not stop.is_set():
            async with manager.session(read_only=True) as session:
                await session.execute(text("SELECT pg_catalog.pg_sleep(0.3)"))

    hogs = [_in_own_context(hog()) for _ in range(6)]
    try:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(replica_server.pause_replay)
        key = uuid.uuid4().hex
        await _in_own_context(_insert(manager, key))
        await asyncio.sleep(3.0)  # three times max_replica_lag, probes skipped all along
        found, on_replica = await _in_own_context(_read(manager, key))
    finally:
        stop.set()
        await asyncio.gather(*hogs)
        await asyncio.to_thread(replica_server.resume_replay)
    assert found or not on_replica, "a stale read from a replica 3x past max_replica_lag"


async def test_an_idle_replica_stays_in_use_after_a_wal_segment_switch(
    small_manager: DatabaseSessionManager, fault_server: FaultServer
) -> None:
    """The primary's insert position then sits past a page header, which replay never reports."""
    manager = small_manager
    await _until_replica_used(manager)
    await _in_own_context(_write(manager))
    fault_server.psql("SELECT pg_catalog.pg_switch_wal()")
    await asyncio.sleep(2.5)  # idle, well past max_replica_lag
    assert (await _in_own_context(_read(manager)))[1], manager.replica_status()


@pytest.mark.parametrize("loads_orm_objects", [True, False], ids=["orm", "sql"])
async def test_a_short_stall_between_statements_fails_no_read(
    small_manager: DatabaseSessionManager,
    replica_server: ReplicaServer,
    replica_proxy: FaultProxy,
    loads_orm_objects: bool,
) -> None:
    """Under CUT_AFTER_SECONDS the unit waits it out, ORM objects and all; it is not cut."""
    manager = small_manager

    async def add_item() -> None:
        async with manager.session() as session:
            session.add(Item(name=f"stall-{uuid.uuid4().hex}"))

    await _in_own_context(add_item())
    await asyncio.to_thread(replica_server.wait_caught_up)
    await _until_replica_used(manager)

    async def unit() -> tuple[object, object]:
        async with manager.session(read_only=True) as session:
            if loads_orm_objects:
                first: object = (await session.scalars(select(Item).limit(1))).one()
            else:
                first = await session.scalar(IN_RECOVERY)
            replica_proxy.stall()
            await asyncio.sleep(1.6)  # probes fail meanwhile; shorter than the cut
            replica_proxy.restore()
            second = await session.scalar(IN_RECOVERY)
            return first, second

    await _in_own_context(unit())


async def _insert(manager: DatabaseSessionManager, key: str) -> None:
    async with manager.session() as session:
        await session.execute(text(f"INSERT INTO {TABLE} VALUES (:key)"), {"key": key})


async def test_a_stall_that_finds_the_replicas_pool_full_fails_no_read(
    small_manager: DatabaseSessionManager, replica_proxy: FaultProxy
) -> None:
    """The probes have a connection of their own: they see the stall, and the cut follows."""
    manager = small_manager
    await _until_replica_used(manager)
    readers, stop = Readers(), asyncio.Event()

    async def read_slowly() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with manager.session(read_only=True) as session:
                    await session.execute(text("SELECT pg_catalog.pg_sleep(0.2)"))
            except Exception as error:  # counted: the test fails on any
                readers.failures.append(f"{type(error).__name__}: {error}")
            readers.latencies.append(time.monotonic() - started)

    load = [_in_own_context(read_slowly()) for _ in range(4)]  # twice the pool
    try:
        await asyncio.sleep(1.0)
        replica_proxy.stall()
        await asyncio.sleep(6.0)
    finally:
        replica_proxy.restore()
        stop.set()
        await asyncio.gather(*load)
    assert readers.failures == [], readers.failures[:3]
    # Cut after CUT_AFTER_SECONDS of failed probes (plus a probe's timeout and interval),
    # not after the 30 s statement timeout.
    assert max(readers.latencies) < 10.0, max(readers.latencies)


async def test_a_replica_far_behind_at_start_up_is_not_used(
    manager: DatabaseSessionManager,
    fault_server: FaultServer,
    replica_server: ReplicaServer,
    replica_proxy: FaultProxy,
) -> None:
    """A new process has no lag history: a replica behind all of it has an unknown lag."""
    await asyncio.to_thread(replica_server.pause_replay)
    try:
        key = uuid.uuid4().hex
        await _in_own_context(_insert(manager, key))
        await asyncio.sleep(3.0)  # the write is older than max_replica_lag (2 s)
        starting = DatabaseSessionManager()  # a pod of a deploy, starting now
        starting.init(
            fault_server.app_url(),
            replica_urls=[replica_server.app_url(port=replica_proxy.port)],
            max_replica_lag=2.0,
        )
        try:
            await starting.verify_replicas()
            found, on_replica = await _in_own_context(_read(starting, key))
        finally:
            await starting.close()
    finally:
        await asyncio.to_thread(replica_server.resume_replay)
    assert found or not on_replica, "a stale read from a replica 3 s behind at start-up"


async def test_a_snapshot_read_moves_off_a_failing_replica_only_before_its_first_statement(
    small_manager: DatabaseSessionManager, replica_proxy: FaultProxy
) -> None:
    """REPEATABLE READ (package README, "Where a read moves"): its connection to the replica
    lost before its first statement, the unit runs on the primary; after it, the snapshot
    is the replica's, so the unit fails with the replica's error rather than move."""
    manager = small_manager

    async def cut_before_the_first_statement() -> object:
        async with manager.session(read_only=True, isolation_level="REPEATABLE READ") as session:
            # Connected to the replica (through the proxy), no statement sent yet.
            assert (await session.connection()).engine.url.port == replica_proxy.port
            replica_proxy.cut()
            return await session.scalar(IN_RECOVERY)

    async def cut_after_the_first_statement() -> None:
        async with manager.session(read_only=True, isolation_level="REPEATABLE READ") as session:
            assert await session.scalar(IN_RECOVERY) is True
            replica_proxy.cut()
            await session.scalar(IN_RECOVERY)

    await _until_replica_used(manager)
    assert await _in_own_context(cut_before_the_first_statement()) is False  # the primary
    await _until_replica_used(manager)  # set aside by the cut until a probe answers again
    with pytest.raises(DBAPIError) as failed:
        await _in_own_context(cut_after_the_first_statement())
    assert classify_error(failed.value) is DatabaseErrorKind.UNAVAILABLE, repr(failed.value)


async def test_an_autocommit_read_moves_off_a_failing_replica_between_its_statements(
    small_manager: DatabaseSessionManager, replica_proxy: FaultProxy
) -> None:
    """Each statement its own snapshot: a later one moves to the primary too, not only the first."""
    manager = small_manager

    async def cut_after_the_first_statement() -> tuple[object, object]:
        async with manager.session(read_only=True) as session:
            first = await session.scalar(IN_RECOVERY)
            replica_proxy.cut()
            return first, await session.scalar(IN_RECOVERY)

    await _until_replica_used(manager)
    assert await _in_own_context(cut_after_the_first_statement()) == (True, False)


async def test_a_serializable_read_runs_on_the_primary_and_leaves_the_replica_usable(
    small_manager: DatabaseSessionManager,
) -> None:
    """A hot standby refuses serializable mode ("cannot use serializable mode in a hot
    standby"): such a unit, deferrable or not, reads from the primary, and the replica's
    pooled connections still serve the other read units."""
    manager = small_manager

    async def where_it_ran(**options: Any) -> object:
        async with manager.session(read_only=True, **options) as session:
            return await session.scalar(IN_RECOVERY)

    await _until_replica_used(manager)
    for deferrable in (False, True):
        serializable = {"isolation_level": "SERIALIZABLE", "deferrable": deferrable}
        assert await _in_own_context(where_it_ran(**serializable)) is False  # the primary
    for options in ({"isolation_level": "REPEATABLE READ"}, {}):
        assert await _in_own_context(where_it_ran(**options)) is True  # the replica


def _replica_connections_in_use(manager: DatabaseSessionManager) -> int:
    # The replica's pool is the manager's own: no public accessor.
    assert manager._replicas is not None
    pool = manager._replicas.replicas[0].engine.pool
    assert isinstance(pool, QueuePool), type(pool).__name__
    return pool.checkedout()


async def test_a_read_cancelled_while_connecting_to_the_replica_propagates_and_leaks_nothing(
    small_manager: DatabaseSessionManager, replica_proxy: FaultProxy
) -> None:
    """Cancelled (its client gone) while asking a stalled replica how far it replayed: the
    cancellation propagates, the connection is back in the pool, and the replica stays in
    use (a cancelled request is not a failing replica)."""
    manager = small_manager
    await _until_replica_used(manager)
    entered = asyncio.Event()

    async def write_then_read() -> None:
        # Stalled first, so that no probe sees the replica replay the write: the unit
        # asks the replica itself, on the connection it just took.
        replica_proxy.stall()
        await _write(manager)
        async with manager.session(read_only=True):
            entered.set()

    reader = _in_own_context(write_then_read())
    try:
        deadline = time.monotonic() + 5
        while _replica_connections_in_use(manager) == 0 and not reader.done():
            assert time.monotonic() < deadline, "the unit never took a replica connection"
            await asyncio.sleep(0.01)
        reader.cancel()
    finally:
        replica_proxy.restore()  # well within the probes' 1 s timeout: nothing set aside
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert not entered.is_set(), "the unit reached its block: not cancelled while connecting"
    assert _replica_connections_in_use(manager) == 0
    [status] = manager.replica_status()
    assert status["in_use"] is True, status
    assert status["failure"] is None, status
