"""A private PgBouncer in transaction mode, in front of the fault tests' own cluster.

Each instance runs Debian's `pgbouncer` (1.18) from a temporary directory of its
own, with a configuration file there and on a free port of 127.0.0.1, so the
machine's own pgbouncer service and `/etc/pgbouncer` are never read or touched.
As root it runs as the `postgres` user, since PgBouncer refuses to run as root.

Authentication stays real on both sides. Clients authenticate to PgBouncer with
SCRAM-SHA-256 against a userlist holding the `app` role's password (the canary)
and a random password for an admin user; PgBouncer logs in to PostgreSQL as
`app` with the same password, again by SCRAM. The admin console (database
`pgbouncer`) is reached with `psql` as that admin user, over TCP.

Signals, as PgBouncer 1.18 documents them: SIGINT is a safe shutdown (PAUSE, then
exit once every server connection is released), SIGTERM an immediate one.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import URL

from tests.drivers import DRIVERNAME
from tests.faults.server import APP_ROLE, CANARY_PASSWORD, DATABASE, _bindir, free_port

ADMIN_USER = "faults_admin"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 60.0
ADMIN_TIMEOUT_SECONDS = 60.0
# Characters of PgBouncer's log quoted when it fails to start.
LOG_TAIL = 3000
STOP_SIGNALS = {"safe": signal.SIGINT, "immediate": signal.SIGTERM}
# systemd hands these to a service it started; a PgBouncer built with systemd
# support would take over the inherited sockets or notify that unit.
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
# The protocol's SSLRequest: any PgBouncer that is up answers it with one byte.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)

# RESUME's answer when there is nothing to resume.
NOT_PAUSED = "pooler is not paused/suspended"

StopMode = Literal["safe", "immediate"]


def pgbouncer_binary() -> Path:
    """Where `pgbouncer` is installed: on PATH, or Debian's /usr/sbin."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if found is None:
        raise RuntimeError(
            "the PgBouncer tests need the pgbouncer program: run `make pgbouncer` "
            "(as root it installs Debian's pgbouncer package), or install pgbouncer yourself"
        )
    return Path(found)


def _userlist_entry(user: str, password: str) -> str:
    # The auth_file format: both fields in double quotes, a quote inside doubled.
    return '"{}" "{}"\n'.format(user.replace('"', '""'), password.replace('"', '""'))


class PgBouncer:
    """One PgBouncer process: start, stop safely or immediately, restart, admin commands."""

    def __init__(
        self,
        upstream_port: int,
        *,
        pool_size: int = 5,
        server_login_retry: float = 1.0,
    ) -> None:
        self._binary = pgbouncer_binary()  # before anything is created: it may be missing
        self.upstream_port = upstream_port
        self.pool_size = pool_size
        self.directory = Path(tempfile.mkdtemp(prefix="faults-pgbouncer-"))
        self.config = self.directory / "pgbouncer.ini"
        self.log = self.directory / "pgbouncer.log"
        self.port = free_port()
        self._admin_password = secrets.token_urlsafe(24)
        self._process: subprocess.Popen[bytes] | None = None
        self._write_files(server_login_retry)

    def _write_files(self, server_login_retry: float) -> None:
        userlist = self.directory / "userlist.txt"
        userlist.write_text(
            _userlist_entry(APP_ROLE, CANARY_PASSWORD)
            + _userlist_entry(ADMIN_USER, self._admin_password)
        )
        userlist.chmod(0o600)
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # TCP only: no socket file in a shared directory
            "auth_type": "scram-sha-256",
            "auth_file": str(userlist),
            "admin_users": ADMIN_USER,
            "pool_mode": "transaction",
            "default_pool_size": str(self.pool_size),
            "max_client_conn": "1000",
            # PgBouncer refuses startup parameters it does not know; psycopg2 and JDBC
            # send this one (asyncpg 0.32 and psycopg 3 send none that needs this).
            "ignore_startup_parameters": "extra_float_digits",
            # Nothing to reset between transactions, and a reset would cost a round trip.
            "server_reset_query": "",
            # After a failed server login PgBouncer refuses new clients for this long
            # (default 15 s), even once PostgreSQL is back: the tests measure the
            # package, not that wait. Production behind a restarting server may want
            # it short too.
            "server_login_retry": str(server_login_retry),
            "logfile": str(self.log),
        }
        self.config.write_text(
            f"[databases]\n{DATABASE} = host=127.0.0.1 port={self.upstream_port} "
            f"dbname={DATABASE}\n\n[pgbouncer]\n"
            + "".join(f"{name} = {value}\n" for name, value in settings.items())
        )
        if os.geteuid() == 0:
            for path in (self.directory, self.config, userlist):
                shutil.chown(path, "postgres", "postgres")

    # --- lifecycle ------------------------------------------------------------------

    def __enter__(self) -> PgBouncer:
        try:
            self.start()
        except BaseException:
            self.destroy()  # __exit__ is not called when __enter__ raises
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.destroy()

    def start(self) -> None:
        """Start PgBouncer on `self.port` and wait until it answers there."""
        if self.is_running():
            raise RuntimeError("this PgBouncer is already running")
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        # PgBouncer refuses to run as root; as root the suite runs it as postgres.
        as_postgres = os.geteuid() == 0
        with (self.directory / "stderr.log").open("ab") as stderr:
            self._process = subprocess.Popen(
                [str(self._binary), str(self.config)],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                user="postgres" if as_postgres else None,
                group="postgres" if as_postgres else None,
                extra_groups=[] if as_postgres else None,
            )
        self._wait_until_accepting()

    def _wait_until_accepting(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._answers():
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self._process.returncode} before it was "
                    f"ready; its log ends:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"pgbouncer did not answer within {START_TIMEOUT_SECONDS} s; "
                    f"its log ends:\n{self._log_tail()}"
                )
            time.sleep(0.01)

    def _answers(self) -> bool:
        """Whether a PgBouncer answers a protocol message on `self.port`."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                probe.sendall(SSL_REQUEST)
                return probe.recv(1) in (b"N", b"S")
        except OSError:
            return False

    def _log_tail(self) -> str:
        texts = [p.read_text(errors="replace") for p in (self.log, self.directory / "stderr.log")]
        return next((text for text in texts if text), "(empty)")[-LOG_TAIL:]

    def stop(self, mode: StopMode = "safe") -> None:
        """Shut down ("safe": SIGINT, "immediate": SIGTERM) and wait for the exit."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(STOP_SIGNALS[mode])
        try:
            process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise TimeoutError(
                f"pgbouncer did not stop ({mode}) within {STOP_TIMEOUT_SECONDS} s; killed it"
            ) from None

    def restart(self, mode: StopMode = "safe") -> None:
        """Stop in `mode`, start again on the same port and wait until it answers."""
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        """Whether the PgBouncer this object started is still running."""
        return self._process is not None and self._process.poll() is None

    def destroy(self) -> None:
        """Stop (immediately) and delete the directory with its config, userlist and log."""
        self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)

    # --- use --------------------------------------------------------------------------

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
