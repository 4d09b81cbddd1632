"""The `pgbouncer` deployment: a private PgBouncer in transaction mode before the run's database.

It runs from a temporary directory of its own, with its configuration there and on
a free port of 127.0.0.1, so a system-wide pgbouncer and `/etc/pgbouncer` are never
read or touched. It logs in to the same server and database as the direct
deployment, as the same user, so the two differ by the pooler's hop alone.
Clients are trusted, as the benchmark's server trusts them on 127.0.0.1; a
password in the URL goes into PgBouncer's userlist, for its own server logins.
As root it runs as the `postgres` user, since PgBouncer refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import URL

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
LOG_TAIL = 2000
# The protocol's SSLRequest: a PgBouncer that is up answers it with one byte.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
# systemd hands these to a service it started; a PgBouncer built with systemd
# support would take over the inherited sockets or notify that unit.
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
RUN_AS = "postgres"


def pgbouncer_binary() -> str | None:
    """Where `pgbouncer` is installed (on PATH, or Debian's /usr/sbin), or None."""
    return shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")


def missing() -> str | None:
    """Why the pgbouncer deployment cannot run here, or None."""
    if pgbouncer_binary() is None:
        return "pgbouncer is not installed (`make pgbouncer` installs Debian's package)"
    return None


def version() -> str:
    """`PgBouncer 1.18.0`, or why not."""
    binary = pgbouncer_binary()
    if binary is None:
        return "PgBouncer (not installed)"
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "PgBouncer (version unknown)"
    return result.stdout.splitlines()[0] if result.stdout else "PgBouncer (version unknown)"


def _quoted(value: str) -> str:
    # The auth_file format: both fields in double quotes, a quote inside doubled.
    return '"{}"'.format(value.replace('"', '""'))


class PgBouncer:
    """One PgBouncer process (pool_mode=transaction) for database `upstream.database`."""

    def __init__(self, upstream: URL, pool_size: int) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError(missing())
        if not upstream.database or not upstream.username:
            raise ValueError("the upstream URL must name a database and a user")
        self._binary = binary
        self.upstream = upstream
        self.pool_size = pool_size
        self.directory = Path(tempfile.mkdtemp(prefix="bench-pgbouncer-"))
        self.log = self.directory / "pgbouncer.log"
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0
        self._write_config()

    def _write_config(self) -> None:
        upstream = self.upstream
        userlist = self.directory / "userlist.txt"
        user, password = _quoted(upstream.username or ""), _quoted(upstream.password or "")
        userlist.write_text(f"{user} {password}\n")
        userlist.chmod(0o600)
        settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # TCP only: no socket file in a shared directory
            "auth_type": "trust",  # the user must still be in auth_file
            "auth_file": str(userlist),
            "pool_mode": "transaction",
            # As many server connections as one variant's pool may hold: a variant
            # never waits on PgBouncer for one. Only one variant runs at a time.
            "default_pool_size": str(self.pool_size),
            "max_client_conn": "500",
            "server_reset_query": "",  # not used in transaction mode anyway
            "log_connections": "0",
            "log_disconnections": "0",
            "logfile": str(self.log),
        }
        host = upstream.host or "127.0.0.1"
        config = self.directory / "pgbouncer.ini"
        config.write_text(
            f"[databases]\n{upstream.database} = host={host} port={upstream.port or 5432} "
            f"dbname={upstream.database}\n\n[pgbouncer]\n"
            + "".join(f"{name} = {value}\n" for name, value in settings.items())
        )
        if self._as_postgres:
            for path in (self.directory, config, userlist):
                shutil.chown(path, RUN_AS, RUN_AS)

    def url(self, url: URL) -> URL:
        """`url` (any driver) through this PgBouncer."""
        return url.set(host="127.0.0.1", port=self.port)

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
        env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        with (self.directory / "stderr.log").open("ab") as stderr:
            self._process = subprocess.Popen(
                [self._binary, str(self.directory / "pgbouncer.ini")],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                user=RUN_AS if self._as_postgres else None,
                group=RUN_AS if self._as_postgres else None,
                extra_groups=[] if self._as_postgres else None,
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._answers():
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"pgbouncer exited with {self._process.returncode} before it was ready; "
                    f"its log ends:\n{self._log_tail()}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"pgbouncer did not answer within {START_TIMEOUT_SECONDS:g} s; "
                    f"its log ends:\n{self._log_tail()}"
                )
            time.sleep(0.01)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                probe.sendall(SSL_REQUEST)
                return probe.recv(1) in (b"N", b"S")
        except OSError:
            return False

    def _log_tail(self) -> str:
        texts = []
        for path in (self.log, self.directory / "stderr.log"):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace"))
        return next((text for text in texts if text), "(empty)")[-LOG_TAIL:]

    def destroy(self) -> None:
        """Stop at once (SIGTERM: its server connections close) and delete the directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def _free_port() -> int:
    # Another process could take it before PgBouncer binds it: then PgBouncer
    # exits, and start() quotes its log.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
