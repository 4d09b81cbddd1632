"""The replica harness does what the replica fault tests will rely on.

A hot standby of the private fault cluster shows the primary's commits once caught
up, shows none of them while its replay is paused (though it has received them), and
survives a stop and start. The rows live in a table of the `postgres` database, apart
from the `faults` database that the other fault tests truncate.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

import asyncpg
import pytest

from tests.faults.proxy import FaultProxy
from tests.faults.replica import ReplicaServer
from tests.faults.server import FaultServer

TABLE = "replica_harness"
# Long enough for a replay that was not really paused to show.
PAUSED_SECONDS = 0.5

# The fixture restarts the replica and resumes its replay, whatever an earlier test did.
pytestmark = pytest.mark.usefixtures("replica_proxy")


@pytest.fixture(name="primary", scope="module")
def primary_fixture(fault_server: FaultServer) -> FaultServer:
    fault_server.psql(f"CREATE TABLE IF NOT EXISTS {TABLE} (id text PRIMARY KEY)")
    return fault_server


def _commit_row(primary: FaultServer) -> str:
    row = uuid.uuid4().hex
    primary.psql(f"INSERT INTO {TABLE} VALUES ('{row}')")
    return row


def _visible(replica: ReplicaServer, row: str) -> bool:
    return replica.psql(f"SELECT count(*) FROM {TABLE} WHERE id = '{row}'") == "1"


def _behind_primary(primary: FaultServer, lsn: str) -> bool:
    return primary.psql(f"SELECT '{lsn}'::pg_lsn < pg_current_wal_lsn()") == "t"


def test_replica_is_a_hot_standby_with_the_schema(
    primary: FaultServer, replica_server: ReplicaServer
) -> None:
    assert replica_server.psql("SELECT pg_is_in_recovery()") == "t"
    assert replica_server.psql("SELECT to_regclass('items')", database="faults") == "items"
    assert primary.psql("SELECT state FROM pg_stat_replication") == "streaming"


def test_committed_row_is_visible_once_caught_up(
    primary: FaultServer, replica_server: ReplicaServer
) -> None:
    row = _commit_row(primary)
    replica_server.wait_caught_up()
    assert _visible(replica_server, row)


def test_paused_replay_hides_received_rows_until_resumed(
    primary: FaultServer, replica_server: ReplicaServer
) -> None:
    replica_server.pause_replay()
    row = _commit_row(primary)
    replica_server.wait_received()
    paused_at = replica_server.replay_lsn()
    time.sleep(PAUSED_SECONDS)

    assert not _visible(replica_server, row)
    assert replica_server.replay_lsn() == paused_at
    assert _behind_primary(primary, paused_at)
    with pytest.raises(TimeoutError, match="had not replayed"):
        replica_server.wait_caught_up(timeout=PAUSED_SECONDS)

    replica_server.resume_replay()
    replica_server.wait_caught_up()
    assert _visible(replica_server, row)
    assert not _behind_primary(primary, replica_server.replay_lsn())


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_stopped_replica_catches_up_after_start(
    primary: FaultServer, replica_server: ReplicaServer, mode: Literal["fast", "immediate"]
) -> None:
    replica_server.stop(mode)
    assert not replica_server.is_running()
    # Its replication slot keeps this WAL on the primary while nothing streams it.
    row = _commit_row(primary)
    replica_server.start()
    assert replica_server.is_running()
    replica_server.wait_caught_up()
    assert _visible(replica_server, row)


async def test_app_role_reads_the_replica_through_the_proxy(
    replica_server: ReplicaServer, replica_proxy: FaultProxy
) -> None:
    url = replica_server.app_url(port=replica_proxy.port)
    assert url.port == replica_proxy.port
    connection = await asyncpg.connect(
        host=url.host,
        port=url.port,
        user=url.username,
        password=url.password,
        database=url.database,
    )
    try:
        assert await connection.fetchval("SELECT pg_is_in_recovery()") is True
        assert await connection.fetchval("SELECT count(*) FROM items") >= 0
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await connection.execute("CREATE TABLE replica_write_attempt ()")
    finally:
        await connection.close()
