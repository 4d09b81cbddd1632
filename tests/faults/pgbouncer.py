"""A private PgBouncer in transaction mode, in front of the fault tests' own cluster.

The process itself (Debian's `pgbouncer` 1.18 from a temporary directory of its
own, on a free port of 127.0.0.1, as `postgres` when root; a safe or an immediate
stop) is run by the benchmark's `PgBouncerProcess`
(`benchmarks/request_path/pgbouncer.py`); this module adds what the tests need.

Authentication stays real on both sides. Clients authenticate to PgBouncer with
SCRAM-SHA-256 against a userlist holding the `app` role's password (the canary)
and a random password for an admin user; PgBouncer logs in to PostgreSQL as
`app` with the same password, again by SCRAM. The admin console (database
`pgbouncer`) is reached with `psql` as that admin user, over TCP.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time

from sqlalchemy.engine import URL

from benchmarks.request_path.pgbouncer import (
    START_TIMEOUT_SECONDS,
    PgBouncerProcess,
    pgbouncer_binary,
)
from benchmarks.request_path.pgbouncer import StopMode as StopMode  # the scenarios use it
from tests.drivers import DRIVERNAME
from tests.faults.server import APP_ROLE, CANARY_PASSWORD, DATABASE, _bindir

ADMIN_USER = "faults_admin"
# A safe stop waits until every client's transaction has ended.
STOP_TIMEOUT_SECONDS = 60.0
ADMIN_TIMEOUT_SECONDS = 60.0
MISSING = (
    "the PgBouncer tests need the pgbouncer program: run `make pgbouncer` "
    "(as root it installs Debian's pgbouncer package), or install pgbouncer yourself"
)

# RESUME's answer when there is nothing to resume.
NOT_PAUSED = "pooler is not paused/suspended"


class PgBouncer(PgBouncerProcess):
    """One PgBouncer process: start, stop safely or immediately, restart, admin commands."""

    stop_timeout = STOP_TIMEOUT_SECONDS

    def __init__(
        self,
        upstream_port: int,
        *,
        pool_size: int = 5,
        server_login_retry: float = 1.0,
    ) -> None:
        if pgbouncer_binary() is None:  # before anything is created
            raise RuntimeError(MISSING)
        self.upstream_port = upstream_port
        self._admin_password = secrets.token_urlsafe(24)
        super().__init__(
            database=DATABASE,
            host="127.0.0.1",
            port=upstream_port,
            users={APP_ROLE: CANARY_PASSWORD, ADMIN_USER: self._admin_password},
            auth_type="scram-sha-256",
            pool_size=pool_size,
            settings={
                "admin_users": ADMIN_USER,
                "max_client_conn": "1000",
                # PgBouncer refuses startup parameters it does not know; psycopg2 and
                # JDBC send this one (asyncpg 0.32 and psycopg 3 send none that needs this).
                "ignore_startup_parameters": "extra_float_digits",
                # After a failed server login PgBouncer refuses new clients for this long
                # (default 15 s), even once PostgreSQL is back: the tests measure the
                # package, not that wait. Production behind a restarting server may want
                # it short too.
                "server_login_retry": str(server_login_retry),
            },
            prefix="faults-pgbouncer-",
        )

    def _psql(self, user: str, password: str, database: str, command: str) -> str:
        """Run `command` through PgBouncer with psql (simple query protocol); its output."""
        result = subprocess.run(
            [
                str(_bindir() / "psql"),
                "-X",  # no ~/.psqlrc
                "-A",
                "-q",
                "-P",
                "footer=off",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                user,
                "-d",
                database,
                "-c",
                command,
            ],
            env={**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "5"},
            capture_output=True,
            text=True,
            timeout=ADMIN_TIMEOUT_SECONDS,
        )
        if result.returncode != 0:
            raise RuntimeError(f"pgbouncer: {command!r} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def admin(self, command: str) -> str:
        """Run `command` on the admin console (e.g. "SHOW POOLS", "PAUSE"); returns psql's
        unaligned output, a header line first."""
        return self._psql(ADMIN_USER, self._admin_password, "pgbouncer", command)

    def wait_until_serving(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Wait until a new client of the `app` role gets a round trip to the server.

        After a server login failed (the server was down), PgBouncer refuses new
        clients for `server_login_retry` even once the server is back.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._psql(APP_ROLE, CANARY_PASSWORD, DATABASE, "SELECT 1")
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close_server_connections(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Close every server connection once released (RECONNECT); wait until none is left.

        The session's PgBouncer shares the cluster with tests that count the `app`
        role's backends, so it must not keep idle ones between the tests that use it.
        """
        self.admin("RECONNECT")
        deadline = time.monotonic() + timeout
        while self.show("SERVERS"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pgbouncer still had server connections after {timeout} s")
            time.sleep(0.01)

    def resume_if_paused(self) -> None:
        """RESUME, unless PgBouncer is not paused (1.18 has no SHOW STATE to ask first)."""
        try:
            self.admin("RESUME")
        except RuntimeError as error:
            if NOT_PAUSED not in str(error):
                raise

    def show(self, what: str) -> list[dict[str, str]]:
        """`SHOW <what>` on the admin console, one dict per row keyed by column name."""
        lines = self.admin(f"SHOW {what}").splitlines()
        if not lines:
            return []
        header = lines[0].split("|")
        return [dict(zip(header, line.split("|"), strict=True)) for line in lines[1:]]

    def app_url(
        self,
        port: int | None = None,
        *,
        drivername: str = DRIVERNAME,
        password: str = CANARY_PASSWORD,
    ) -> URL:
        """The `app` role's URL through this PgBouncer, or through a proxy on `port`."""
        return URL.create(
            drivername,
            username=APP_ROLE,
            password=password,
            host="127.0.0.1",
            port=port or self.port,
            database=DATABASE,
        )
