"""A private PgBouncer in transaction mode, and the benchmark's `pgbouncer` deployment on it.

`PgBouncerProcess` runs one PgBouncer from a temporary directory of its own, with
its configuration there and on a free port of 127.0.0.1, so a system-wide
pgbouncer and `/etc/pgbouncer` are never read or touched. As root it runs as the
`postgres` user, since PgBouncer refuses to run as root. The fault tests' harness
(`tests/faults/pgbouncer.py`) builds on it too. Signals, as PgBouncer 1.18
documents them: SIGINT is a safe shutdown (PAUSE, then exit once every server
connection is released), SIGTERM an immediate one.

`PgBouncer` is the deployment. It logs in to the same server and database as the
direct deployment, as the same user, so the two differ by the pooler's hop alone.
Clients are trusted, as the benchmark's server trusts them on 127.0.0.1; a
password in the URL goes into PgBouncer's userlist, for its own server logins.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import URL
from typing_extensions import Self

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
# Characters of PgBouncer's log quoted when it fails to start.
LOG_TAIL = 3000
# The protocol's SSLRequest: a PgBouncer that is up answers it with one byte.
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
# systemd hands these to a service it started; a PgBouncer built with systemd
# support would take over the inherited sockets or notify that unit.
SYSTEMD_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "NOTIFY_SOCKET")
RUN_AS = "postgres"

StopMode = Literal["safe", "immediate"]
STOP_SIGNALS = {"safe": signal.SIGINT, "immediate": signal.SIGTERM}


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


class PgBouncerProcess:
    """One PgBouncer process (pool_mode=transaction) for one upstream database.

    `users` (name: password) is its auth_file: the clients it lets in, and the
    passwords it logs in to the server with. `settings` are added to, or replace,
    the [pgbouncer] section's.
    """

    stop_timeout = STOP_TIMEOUT_SECONDS

    def __init__(
        self,
        *,
        database: str,
        host: str,
        port: int,
        users: Mapping[str, str],
        auth_type: str,
        pool_size: int,
        settings: Mapping[str, str] | None = None,
        prefix: str = "pgbouncer-",
    ) -> None:
        binary = pgbouncer_binary()
        if binary is None:  # before anything is created
            raise RuntimeError(missing())
        self._binary = binary
        self.pool_size = pool_size
        self.directory = Path(tempfile.mkdtemp(prefix=prefix))
        self.config = self.directory / "pgbouncer.ini"
        self.log = self.directory / "pgbouncer.log"
        self.port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0
        userlist = self.directory / "userlist.txt"
        userlist.write_text("".join(f"{_quoted(u)} {_quoted(p)}\n" for u, p in users.items()))
        userlist.chmod(0o600)
        section = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",  # TCP only: no socket file in a shared directory
            "auth_type": auth_type,  # even with "trust" the user must be in auth_file
            "auth_file": str(userlist),
            "pool_mode": "transaction",
            "default_pool_size": str(pool_size),
            "server_reset_query": "",  # not used in transaction mode anyway
            "logfile": str(self.log),
            **(settings or {}),
        }
        self.config.write_text(
            f"[databases]\n{database} = host={host} port={port} dbname={database}\n\n"
            "[pgbouncer]\n" + "".join(f"{name} = {value}\n" for name, value in section.items())
        )
        if self._as_postgres:
            for path in (self.directory, self.config, userlist):
                shutil.chown(path, RUN_AS, RUN_AS)

    def __enter__(self) -> Self:
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
        with (self.directory / "stderr.log").open("ab") as stderr:
            self._process = subprocess.Popen(
                [self._binary, str(self.config)],
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

    def stop(self, mode: StopMode = "safe") -> None:
        """Shut down ("safe": SIGINT, "immediate": SIGTERM) and wait for the exit."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(STOP_SIGNALS[mode])
        try:
            process.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise TimeoutError(
                f"pgbouncer did not stop ({mode}) within {self.stop_timeout:g} s; killed it"
            ) from None

    def restart(self, mode: StopMode = "safe") -> None:
        """Stop in `mode`, start again on the same port and wait until it answers."""
        self.stop(mode)
        self.start()

    def is_running(self) -> bool:
        """Whether the PgBouncer this object started is still running."""
        return self._process is not None and self._process.poll() is None

    def destroy(self) -> None:
        """Stop at once (its server connections close) and delete the directory."""
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


class PgBouncer(PgBouncerProcess):
    """The `pgbouncer` deployment: database `upstream.database`, as `upstream.username`."""

    def __init__(self, upstream: URL, pool_size: int) -> None:
        if not upstream.database or not upstream.username:
            raise ValueError("the upstream URL must name a database and a user")
        self.upstream = upstream
        super().__init__(
            database=upstream.database,
            host=upstream.host or "127.0.0.1",
            port=upstream.port or 5432,
            users={upstream.username: upstream.password or ""},
            auth_type="trust",
            # As many server connections as one variant's pool may hold: a variant
            # never waits on PgBouncer for one. Only one variant runs at a time.
            pool_size=pool_size,
            settings={"max_client_conn": "500", "log_connections": "0", "log_disconnections": "0"},
            prefix="bench-pgbouncer-",
        )

    def url(self, url: URL) -> URL:
        """`url` (any driver) through this PgBouncer."""
        return url.set(host="127.0.0.1", port=self.port)


def _free_port() -> int:
    # Another process could take it before PgBouncer binds it: then PgBouncer
    # exits, and start() quotes its log.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
