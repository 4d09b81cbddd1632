"""Connection failures that say where: the driver's network errors, with host and port.

asyncpg reports a DNS failure as "Name or service not known" and a connect
timeout as a `TimeoutError` with no message at all; neither names the server.
The password never appears: only host, port and the timeout are used.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine


def install_connect_errors(engine: Engine) -> None:
    """Re-raise network errors of new connections, same class, with host and port named."""
    event.listen(engine, "do_connect", _connect)


def _connect(dialect: Any, _: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    try:
        return dialect.connect(*cargs, **cparams)
    except OSError as error:  # refused, reset, unresolvable, timed out
        raise _located(error, cparams) from error


def _located(error: OSError, cparams: dict[str, Any]) -> OSError:
    # The same class, so `except ConnectionRefusedError` and classify_error still work.
    where = f"{cparams.get('host')}:{cparams.get('port')}"
    if isinstance(error, TimeoutError):
        return TimeoutError(
            f"the database at {where} did not answer within {cparams.get('timeout')} s "
            "(connect_args['timeout']): check the network path to it and the server's load"
        )
    reason = os.strerror(error.errno) if isinstance(error.errno, int) and error.errno > 0 else ""
    if isinstance(error, socket.gaierror):
        reason = error.strerror or reason
        message = f"could not resolve the database host in {where} ({reason}): check the URL's host"
    else:
        message = (
            f"could not connect to the database at {where} ({reason or error}): check that "
            "the server is running and the URL's host and port"
        )
    return type(error)(error.errno, message)
