"""A hot standby of a `FaultServer`, whose replay the tests may pause, resume and stop.

It is a cluster of the same kind as its primary (own temporary directory, own port,
the same roles, since it is a copy), so it reuses `FaultServer` for everything but
how it comes to exist: `pg_basebackup` instead of `initdb`. It streams over TCP as
`postgres` from a replication slot of its own, so the primary keeps the WAL that a
stopped or lagging replica still needs, however long a test keeps it stopped.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from typing import Literal

from tests.faults.server import FaultServer

# A standby retries a lost primary after this long; the default (5 s) would make
# every test that restarts the primary wait for the replica to notice.
WAL_RETRIEVE_RETRY_INTERVAL = "'100ms'"
POLL_SECONDS = 0.05


class ReplicaServer(FaultServer):
    """One hot standby of `primary`, on its own port and socket directory."""

    def __init__(self, primary: FaultServer) -> None:
        super().__init__()
        self.primary = primary
        self.slot = f"replica_{self.port}"

    def create(self) -> None:
        """Base-backup the primary, configure, start; wait until it serves read-only."""
        self._run(
            str(self._bin / "pg_basebackup"),
            *("-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres"),
            *("-D", str(self.data), "-R", "-X", "stream", "-C", "-S", self.slot),
            # A spread checkpoint on the primary would make this take tens of seconds.
            "--checkpoint=fast",
            # As initdb's --no-sync in FaultServer.create: no fsync of the copied files,
            # which only an OS crash would need; the standby runs with fsync on.
            "--no-sync",
        )
        # The copied postgresql.conf names the primary's port and socket directory;
        # later lines win.
        settings = {
            "port": self.port,
            "unix_socket_directories": f"'{self.directory}'",
            "hot_standby": "on",
            "wal_retrieve_retry_interval": WAL_RETRIEVE_RETRY_INTERVAL,
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        self.start()
        if self.psql("SELECT pg_is_in_recovery()") != "t":
            raise RuntimeError(f"the replica on port {self.port} is not in recovery")

    def migrate(self) -> None:
        raise TypeError("a standby is read-only: migrate its primary")

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Shut down in `mode` and wait until the postmaster has exited."""
        self.signal_shutdown(mode)
        self.wait_stopped()

    def pause_replay(self, timeout: float = 30.0) -> None:
        """Stop applying WAL (it is still received); what the primary commits next stays
        invisible here until `resume_replay()`."""
        self.psql("SELECT pg_wal_replay_pause()")
        # Until 'paused', the record being applied may still move the replay LSN; a
        # query holding up replay (a recovery conflict) delays that up to 30 s.
        deadline = time.monotonic() + timeout
        while self.psql("SELECT pg_get_wal_replay_pause_state()") != "paused":
            if time.monotonic() > deadline:
                raise TimeoutError(f"replay on the replica did not pause within {timeout} s")
            time.sleep(POLL_SECONDS)

    def resume_replay(self) -> None:
        """Apply WAL again; a no-op if replay is not paused."""
        self.psql("SELECT pg_wal_replay_resume()")

    def replay_lsn(self) -> str:
        """The end of the last WAL record applied here, as PostgreSQL prints an LSN."""
        return self.psql("SELECT pg_last_wal_replay_lsn()")

    def wait_received(self, timeout: float = 30.0) -> None:
        """Wait until all WAL the primary has written so far is on this replica's disk,
        applied or not: after it, a row still invisible here is replay lag, not transport."""
        self._wait_for("pg_last_wal_receive_lsn()", "received", timeout)

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until this replica has applied all WAL the primary has written so far."""
        self._wait_for("pg_last_wal_replay_lsn()", "replayed", timeout)

    def _wait_for(self, position: str, what: str, timeout: float) -> None:
        target = self.primary.psql("SELECT pg_current_wal_lsn()")
        # Compared by PostgreSQL, which knows how to order LSNs.
        query = f"SELECT coalesce({position} >= '{target}'::pg_lsn, false)"
        deadline = time.monotonic() + timeout
        while self.psql(query) != "t":
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the replica had not {what} the primary's WAL up to {target} within "
                    f"{timeout} s (replayed up to {self.replay_lsn()})"
                )
            time.sleep(POLL_SECONDS)

    def destroy(self) -> None:
        """Stop the replica (immediately), delete its files, free its slot on the primary."""
        super().destroy()
        if self.primary.is_running():
            self._drop_slot()

    def _drop_slot(self) -> None:
        # The primary's walsender lets go of the slot a moment after the replica is gone.
        deadline = time.monotonic() + 10.0
        query = (
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            f" WHERE slot_name = '{self.slot}' AND NOT active"
        )
        remaining = f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{self.slot}'"
        with contextlib.suppress(subprocess.CalledProcessError):
            while self.primary.psql(remaining) != "0" and time.monotonic() < deadline:
                self.primary.psql(query)
                time.sleep(POLL_SECONDS)
