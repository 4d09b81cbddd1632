"""The driver the integration and fault tiers run on: `TEST_DRIVER` (asyncpg by default).

`make test` runs those tiers once per driver; the unit tier is driver-independent.
Set in the environment so that xdist workers and service subprocesses agree.
"""

from __future__ import annotations

import os
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
