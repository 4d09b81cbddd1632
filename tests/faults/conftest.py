"""Fixtures for the fault tests: a private PostgreSQL cluster, a TCP fault proxy, a
private PgBouncer in transaction mode in front of the cluster, and a hot standby of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.pgbouncer import PgBouncer
from tests.faults.proxy import FaultProxy
from tests.faults.replica import ReplicaServer
from tests.faults.scenarios import PGBOUNCER_POOL_SIZE
from tests.faults.server import FaultServer


@pytest.fixture(name="fault_server", scope="session")
def fault_server_fixture() -> Iterator[FaultServer]:
    """A cluster of this test session's own, migrated, that tests may restart or crash."""
    server = FaultServer()
    try:
        server.create()
        server.migrate()
        yield server
    finally:
        server.destroy()


@pytest.fixture(name="proxy")
def proxy_fixture(fault_server: FaultServer) -> Iterator[FaultProxy]:
    """A fault proxy in front of `fault_server`, forwarding until told otherwise."""
    if not fault_server.is_running():  # a test that stopped it must not break the next
        fault_server.start()
    with FaultProxy(upstream_port=fault_server.port) as proxy:
        yield proxy


@pytest.fixture(name="replica_server", scope="session")
def replica_server_fixture(fault_server: FaultServer) -> Iterator[ReplicaServer]:
    """A hot standby of `fault_server`, copied after the migration so it has the schema."""
    replica = ReplicaServer(fault_server)
    try:
        replica.create()
        yield replica
    finally:
        replica.destroy()


@pytest.fixture(name="replica_proxy")
def replica_proxy_fixture(
    fault_server: FaultServer, replica_server: ReplicaServer
) -> Iterator[FaultProxy]:
    """A fault proxy in front of `replica_server`, which starts replaying and caught up."""
    # A test that stopped either server or paused replay must not break the next.
    if not fault_server.is_running():
        fault_server.start()
    if not replica_server.is_running():
        replica_server.start()
    replica_server.resume_replay()
    replica_server.wait_caught_up()
    with FaultProxy(upstream_port=replica_server.port) as proxy:
        yield proxy


@pytest.fixture(name="pgbouncer", scope="session")
def pgbouncer_fixture(fault_server: FaultServer) -> Iterator[PgBouncer]:
    """A PgBouncer of this test session's own in front of `fault_server` (5 server connections)."""
    with PgBouncer(fault_server.port, pool_size=PGBOUNCER_POOL_SIZE) as pgbouncer:
        yield pgbouncer


@pytest.fixture(name="pooler_proxy")
def pooler_proxy_fixture(fault_server: FaultServer, pgbouncer: PgBouncer) -> Iterator[FaultProxy]:
    """A fault proxy in front of `pgbouncer`, so faults can hit the service's side of it."""
    # A test that stopped, crashed or paused either of them must not break the next.
    if not fault_server.is_running():
        fault_server.start()
    if not pgbouncer.is_running():
        pgbouncer.start()
    with FaultProxy(upstream_port=pgbouncer.port) as proxy:
        yield proxy


@pytest.fixture(autouse=True)
def _pgbouncer_left_clean(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used the session's PgBouncer: resumed, no server connection kept.

    Other tests on the same cluster count the `app` role's backends, and PgBouncer's
    idle server connections are such backends. Autouse fixtures are set up first,
    so this runs after the test's own fixtures (its service, its engine) are closed.
    """
    if "pgbouncer" not in request.fixturenames:
        yield
        return
    pgbouncer: PgBouncer = request.getfixturevalue("pgbouncer")
    yield
    if pgbouncer.is_running():
        pgbouncer.resume_if_paused()
        pgbouncer.close_server_connections()
