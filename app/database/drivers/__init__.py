"""The PostgreSQL drivers the package knows, each in a module of its own.

A driver module is imported only when an engine uses it, so the package works
with either driver installed alone.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

from ._base import COMMAND_TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS, Driver

__all__ = [
    "COMMAND_TIMEOUT_SECONDS",
    "CONNECT_TIMEOUT_SECONDS",
    "Driver",
    "driver_for",
    "driver_of",
    "imported",
    "in_use",
    "remember_driver",
]

# SQLAlchemy's driver name -> the module whose DRIVER implements it.
_MODULES = {"asyncpg": "._asyncpg", "psycopg": "._psycopg"}
_loaded: dict[str, Driver] = {}


def driver_for(name: str) -> Driver | None:
    """The package's support for SQLAlchemy driver `name`; None for other drivers."""
    if name not in _loaded:
        module = _MODULES.get(name)
        if module is None:
            return None
        _loaded[name] = importlib.import_module(module, __name__).DRIVER
    return _loaded[name]


def in_use() -> list[Driver]:
    """The drivers some engine of this process was built with."""
    return list(_loaded.values())


def imported() -> list[Driver]:
    """The drivers whose library this process has imported, engine of the package or not.

    For an error from an engine the package did not build (a service's Alembic
    env.py, on another driver than its app): the library that raised it is imported.
    """
    # Not through driver_for(): in_use() must not grow.
    return [
        importlib.import_module(module, __name__).DRIVER
        for name, module in _MODULES.items()
        if name in sys.modules
    ]


# Where each pooled connection records its driver, for the pool's listeners,
# which are given the connection but neither its engine nor its dialect.
_DRIVER_KEY = "app.database.driver"


def remember_driver(engine: Engine, driver: Driver) -> None:
    """Record `driver` on each new connection of `engine`, for `driver_of()`."""

    def remember(_: Any, record: ConnectionPoolEntry) -> None:
        record.info[_DRIVER_KEY] = driver

    event.listen(engine, "connect", remember, insert=True)


def driver_of(record: ConnectionPoolEntry | PoolProxiedConnection) -> Driver:
    """The driver of a pooled connection (its pool entry, or the connection checked out)
    whose engine called `remember_driver()`."""
    driver: Driver = record.info[_DRIVER_KEY]
    return driver
