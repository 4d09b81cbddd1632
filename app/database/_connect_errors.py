"""Connection failures that say where: the driver's network errors, with host and port.

asyncpg reports a DNS failure as "Name or service not known" and a connect
timeout as a `TimeoutError` with no message at all; neither names the server.
The password never appears: only host, port and the timeout are used.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from sqlalchemy.engine import Engine


def install_connect_errors(engine: Engine) -> None:
    """Re-raise network errors of new connections, same class, with host and port named."""
    dialect: Any = engine.dialect  # this engine's own dialect instance
    connect = dialect.connect

    # Wrapping connect() rather than listening for "do_connect": SQLAlchemy stops at
    # the first do_connect listener that returns a connection, which would silence
    # the caller's own (a rotating-token recipe, for one). connect() runs after them.
    def connect_naming_the_server(*cargs: Any, **cparams: Any) -> Any:
        try:
            return connect(*cargs, **cparams)
        # Network failures only: a TLS or authentication error says enough already.
        # (asyncio.TimeoutError is TimeoutError from Python 3.11, not before.)
        except (ConnectionError, socket.gaierror, asyncio.TimeoutError) as error:
            raise _located(error, cparams) from error

    dialect.connect = connect_naming_the_server


def _located(error: Exception, cparams: dict[str, Any]) -> Exception:
    # The same class, so `except ConnectionRefusedError` and classify_error still work.
    where = f"{cparams.get('host')}:{cparams.get('port')}"
    if isinstance(error, asyncio.TimeoutError):
        return type(error)(
            f"the database at {where} did not answer within {cparams.get('timeout')} s "
            "(connect_args['timeout']): check the network path to it and the server's load"
        )
    assert isinstance(error, OSError)
    reason = error.strerror or str(error)
    if isinstance(error, socket.gaierror):
        message = f"could not resolve the database host in {where} ({reason}): check the URL's host"
    else:
        message = (
            f"could not connect to the database at {where} ({reason}): check that "
            "the server is running and the URL's host and port"
        )
    return type(error)(error.errno, message)
