"""Connection failures that say where: the driver's network errors, with host and port.

The password never appears: only host, port and the timeout are used.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from .drivers import Driver


def install_connect_errors(engine: Engine, driver: Driver) -> None:
    """Re-raise network errors of new connections, same class, with host and port named."""
    dialect: Any = engine.dialect  # this engine's own dialect instance
    connect = dialect.connect

    # Wrapping connect() rather than listening for "do_connect": SQLAlchemy stops at
    # the first do_connect listener that returns a connection, which would silence
    # the caller's own (a rotating-token recipe, for one). connect() runs after them.
    def connect_naming_the_server(*cargs: Any, **cparams: Any) -> Any:
        try:
            return connect(*cargs, **cparams)
        except Exception as error:
            where = f"{cparams.get('host')}:{cparams.get('port')}"
            timeout = cparams.get("timeout", cparams.get("connect_timeout"))
            located = driver.locate_connect_error(error, where, timeout)
            if located is None:
                raise
            raise located from error

    dialect.connect = connect_naming_the_server
