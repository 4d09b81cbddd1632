"""A throwaway PostgreSQL cluster that the fault tests may stop, crash and restart.

The developers' server on :5432 is never disturbed: each test session that needs
faults runs `initdb` into a temporary directory and starts its own postmaster on
a free port. It is durable (fsync and synchronous_commit on), so "no acknowledged
write lost" means something, and it checks passwords (scram-sha-256) for the
`app` role, so wrong-password paths are real.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

from sqlalchemy.engine import URL

from tests.drivers import DRIVERNAME
from tests.paths import REPO_ROOT

# Needs percent-encoding in a URL: '@', ':', '/', '%', '#' and '?' all appear.
CANARY_PASSWORD = "Cn4ry-7f3a:p@ss/w%rd#?"
APP_ROLE = "app"
DATABASE = "faults"
# Signals to the postmaster, as PostgreSQL documents its shutdown modes.
SHUTDOWN_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _bindir() -> Path:
    configured = os.environ.get("PG_BINDIR")
    if configured:
        return Path(configured)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        raise RuntimeError(
            "the fault tests need PostgreSQL's server binaries (initdb, pg_ctl): install "
            "the postgresql package or set PG_BINDIR to the directory holding them"
        )
    return candidates[-1].parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _as_postgres(*command: str) -> list[str]:
    # PostgreSQL refuses to run as root; CI machines run the suite as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return list(command)


class FaultServer:
    """One private cluster: start, stop in any shutdown mode, restart, kill backends."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="faults-pg-"))
        self.data = self.directory / "data"
        self.log = self.directory / "server.log"
        self.port = free_port()
        self._bin = _bindir()
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")

    def _run(self, *command: str) -> None:
        subprocess.run(_as_postgres(*command), check=True, capture_output=True, timeout=60)

    def create(self) -> None:
        """initdb, configure and start; then create the `app` role and its database."""
        self._run(
            str(self._bin / "initdb"),
            *("-D", str(self.data), "-A", "trust", "-U", "postgres"),
            # Skips only initdb's closing fsync of the new files (about 1 s of 3): that
            # guards against an OS crash, which no test causes; the server itself runs
            # with fsync on, so a COMMIT is still durable as the tests require.
            "--no-sync",
        )
        settings = {
            "port": self.port,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.directory}'",
            "max_connections": 60,
            "shared_buffers": "'32MB'",
            "fsync": "on",
            "synchronous_commit": "on",
            "password_encryption": "'scram-sha-256'",
            "log_connections": "off",
            # So tests/faults/replica.py can stream a hot standby from it.
            "wal_level": "replica",
            "max_wal_senders": 4,
            "hot_standby": "on",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        # The superuser keeps trust (the tests' observer); the app must give a password.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host replication postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        self.start()
        quoted = CANARY_PASSWORD.replace("'", "''")
        self.psql(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{quoted}'")
        self.psql(f"CREATE DATABASE {DATABASE} OWNER {APP_ROLE}")

    def migrate(self) -> None:
        """Bring the `faults` database to the head revision, as the `app` role."""
        url = self.app_url().render_as_string(hide_password=False)
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=REPO_ROOT,
            env={**os.environ, "DATABASE_URL": url},
            check=True,
            capture_output=True,
            timeout=120,
        )

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run `sql` as the superuser over the private socket; returns the output."""
        result = subprocess.run(
            _as_postgres(
                str(self._bin / "psql"),
                "-h",
                str(self.directory),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-Atqc",
                sql,
            ),
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        return result.stdout.strip()

    def start(self) -> None:
        """Start the postmaster and wait until it accepts connections."""
        self._run(
            str(self._bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start"
        )

    def postmaster_pid(self) -> int:
        """The running postmaster's PID, from its pid file."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def signal_shutdown(self, mode: Literal["smart", "fast", "immediate"]) -> None:
        """Begin a shutdown in `mode` without waiting for it to finish."""
        os.kill(self.postmaster_pid(), SHUTDOWN_SIGNALS[mode])

    def wait_stopped(self, timeout: float = 60.0) -> None:
        """Wait until the postmaster has exited (its pid file is gone)."""
        deadline = time.monotonic() + timeout
        while (self.data / "postmaster.pid").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fault server did not stop within {timeout} s")
            time.sleep(0.02)

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Shut down in `mode`, wait for the exit, start again and wait until ready."""
        self.signal_shutdown(mode)
        self.wait_stopped()
        self.start()

    def is_running(self) -> bool:
        """Whether a postmaster is up (its pid file exists)."""
        return (self.data / "postmaster.pid").exists()

    def app_url(self, *, port: int | None = None, password: str = CANARY_PASSWORD) -> URL:
        """The `app` role's URL, directly or through a proxy listening on `port`."""
        return URL.create(
            DRIVERNAME,
            username=APP_ROLE,
            password=password,
            host="127.0.0.1",
            port=port or self.port,
            database=DATABASE,
        )

    def superuser_dsn(self) -> str:
        """A plain asyncpg DSN for the superuser, straight to the server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def destroy(self) -> None:
        """Stop the server (immediately) and delete its files."""
        if self.is_running():
            self.signal_shutdown("immediate")
            self.wait_stopped()
        shutil.rmtree(self.directory, ignore_errors=True)
