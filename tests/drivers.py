"""The driver the integration and fault tiers run on: `TEST_DRIVER` (asyncpg by default).

`make test` runs those tiers once per driver; the unit tier is driver-independent.
Set in the environment so that xdist workers and service subprocesses agree.
"""

from __future__ import annotations

import os

DRIVERS = ("asyncpg", "psycopg")
DRIVER = os.environ.get("TEST_DRIVER", "asyncpg")
if DRIVER not in DRIVERS:
    raise RuntimeError(f"TEST_DRIVER must be one of {', '.join(DRIVERS)}, not {DRIVER!r}")
DRIVERNAME = f"postgresql+{DRIVER}"
"""The URL scheme of the driver under test, e.g. `postgresql+psycopg`."""
