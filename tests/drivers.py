"""The driver the integration and fault tiers run on: `TEST_DRIVER` (asyncpg by default).

`make test` runs those tiers once per driver; the unit tier is driver-independent.
Set in the environment so that xdist workers and service subprocesses agree.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

DRIVERS = ("asyncpg", "psycopg")
DRIVER = os.environ.get("TEST_DRIVER", "asyncpg")
if DRIVER not in DRIVERS:
    raise RuntimeError(f"TEST_DRIVER must be one of {', '.join(DRIVERS)}, not {DRIVER!r}")
DRIVERNAME = f"postgresql+{DRIVER}"
"""The URL scheme of the driver under test, e.g. `postgresql+psycopg`."""


def application_name(name: str) -> dict[str, Any]:
    """`connect_args` that name the connections' backends in pg_stat_activity."""
    if DRIVER == "asyncpg":
        return {"server_settings": {"application_name": name}}
    return {"application_name": name}  # a libpq connection parameter


def backend_pid(driver_connection: Any) -> int:
    """The server process of a driver's connection, known without a round trip."""
    pid: int
    if DRIVER == "asyncpg":
        pid = driver_connection.get_server_pid()
    else:
        pid = driver_connection.info.backend_pid
    return pid


# libpq counts connect_timeout in whole seconds, 2 at least; asyncpg takes any float.
MIN_CONNECT_TIMEOUT = 0.0 if DRIVER == "asyncpg" else 2.0


def timeouts(*, connect: float, command: float) -> dict[str, Any]:
    """`connect_args` bounding connecting and each statement (seconds), as the driver names them."""
    if DRIVER == "asyncpg":
        return {"timeout": connect, "command_timeout": command}
    # command_timeout: the package's own option for psycopg (drivers/_psycopg.py).
    return {"connect_timeout": max(MIN_CONNECT_TIMEOUT, connect), "command_timeout": command}


def command_timeout_of(driver_connection: Any) -> float | None:
    """The statement timeout a driver's connection was opened with."""
    if DRIVER == "asyncpg":
        return driver_connection._config.command_timeout  # type: ignore[no-any-return]
    return driver_connection.command_timeout  # type: ignore[no-any-return]


def on_begin_done(driver_connection: Any, callback: Callable[[], None]) -> None:
    """Call `callback` each time the connection's implicit BEGIN has been answered.

    Both drivers send BEGIN themselves, with a transaction's first statement and
    after SQLAlchemy's before_cursor_execute: no SQLAlchemy event marks its end.
    """
    if DRIVER == "asyncpg":
        # asyncpg logs each query once it is answered (through call_soon).
        def logged(record: Any) -> None:
            if record.exception is None and record.query.startswith("BEGIN"):
                callback()

        driver_connection.add_query_logger(logged)
        return
    # psycopg has no query log. Its cursors send BEGIN from the connection's
    # `_start_query` generator, in the same wait as the statement that follows: the
    # generator's end, when it sent one, is the moment BEGIN's answer was read, before
    # the statement goes out. Private, so checked: a psycopg that moved it fails here.
    from psycopg.pq import TransactionStatus

    idle_status = TransactionStatus.IDLE
    original = getattr(driver_connection, "_start_query", None)
    if original is None or not callable(original):
        raise AssertionError(
            f"{type(driver_connection).__name__} has no _start_query(): psycopg no longer "
            "starts transactions where tests/drivers.py on_begin_done() watches"
        )

    def start_query() -> Generator[Any, Any, None]:  # as psycopg's: a PQGen[None]
        idle = driver_connection.pgconn.transaction_status == idle_status
        sends_begin = idle and not driver_connection.autocommit
        yield from original()
        if sends_begin and driver_connection.pgconn.transaction_status != idle_status:
            callback()  # BEGIN answered, and the transaction open

    driver_connection._start_query = start_query
