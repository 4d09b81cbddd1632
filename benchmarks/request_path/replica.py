"""The `replica` deployment: a private primary and a hot standby streaming from it.

The shared server on :5432 has no standby, and one cannot be added to it, so this
deployment builds its own pair with the fault tests' harness: `FaultServer`
(`initdb` into a temporary directory, its own free port, configured for streaming)
and `ReplicaServer` (`pg_basebackup -R` of it, on another free port). Both are
built only when the deployment is selected, and destroyed (servers stopped,
directories deleted, the replication slot dropped) at the end of the run.

Every variant of this deployment runs on the private primary, as its `app` role
(the password the harness gives it); ours and ours_read also get the standby in
`replica_urls`. The harness configures its cluster for fault tests (fsync on,
shared_buffers 32 MB, SCRAM for `app`), so this deployment's figures compare with
each other, and with `direct`'s only through the raw pool's ratio between the two.
"""

from __future__ import annotations

import asyncio

import asyncpg
from sqlalchemy.engine import URL

from .shape import CREATE_TABLE, FILL_TABLE
from .variants import Servers


def missing() -> str | None:
    """Why the replica deployment cannot run here, or None."""
    try:
        from tests.faults.server import _bindir
    except ImportError as error:  # run outside a checkout that has the tests
        return f"the fault tests' cluster harness does not import: {error}"
    try:
        bindir = _bindir()
    except RuntimeError as error:
        return str(error)
    if not (bindir / "pg_basebackup").exists():
        return f"pg_basebackup is not in {bindir}"
    return None


class ReplicaDeployment:
    """A private primary holding the benchmark's table, and a standby that has replayed it."""

    def __init__(self) -> None:
        # Imported here: the harness is only needed when the deployment is selected.
        from tests.faults.replica import ReplicaServer
        from tests.faults.server import FaultServer

        self.primary = FaultServer()
        self.replica = ReplicaServer(self.primary)

    async def start(self) -> str:
        """Build both clusters and the table; return the primary's server version."""
        await asyncio.to_thread(self.primary.create)
        # The standby first, then the table: the table reaches it by streaming, so a
        # standby that does not stream fails here instead of serving a stale copy.
        await asyncio.to_thread(self.replica.create)
        connection = await asyncpg.connect(dsn(self.primary.app_url()))
        try:
            await connection.execute(CREATE_TABLE)
            await connection.execute(FILL_TABLE)
            version = str(await connection.fetchval("SHOW server_version"))
        finally:
            await connection.close()
        await asyncio.to_thread(self.replica.wait_caught_up)
        return version

    @property
    def servers(self) -> Servers:
        return Servers(self.primary.app_url(), (self.replica.app_url(),))

    @property
    def ports(self) -> tuple[int, int]:
        return self.primary.port, self.replica.port

    def destroy(self) -> None:
        """Stop and delete the standby, then the primary; safe after a failed start."""
        try:
            self.replica.destroy()
        finally:
            self.primary.destroy()


def dsn(url: URL) -> str:
    """`url` as a plain asyncpg DSN, password included."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)
