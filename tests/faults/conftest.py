"""Fixtures for the fault tests: a private PostgreSQL cluster and a TCP fault proxy."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.proxy import FaultProxy
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
