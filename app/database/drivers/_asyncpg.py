"""asyncpg: bounded waits, cheap checks, prompt cuts and pooler-safe statements.

asyncpg is imported lazily (only `cancel_sender` and `classify` need it), so
this module loads wherever the package does.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from typing import Any

from sqlalchemy.engine import URL

from .._classify import DatabaseErrorKind
from .._errors import DatabaseConfigError
from ._base import (
    COMMAND_TIMEOUT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    CancelSender,
    Driver,
    traceback_frames,
)

# The frame every new asyncpg connection passes through: `asyncpg.connect()`.
_CONNECT_FRAME = ("asyncpg.connection", "connect")


def _unnamed_statement() -> str:
    # The unnamed statement: each Parse replaces it, so none stays on the server
    # connection after its transaction. Named ones would: asyncpg closes a
    # statement lazily, on a later transaction that the pooler may run elsewhere,
    # and unique names (SQLAlchemy's documented recipe) then pile up on the
    # pooler's server connections (measured: 11-21 each after 1,000 units).
    return ""


# What transaction-pooler mode needs (README, "Transaction poolers"): no statement
# prepared by asyncpg or by SQLAlchemy's adapter may be reused in a later
# transaction, which may run on another server connection, or collide with
# another client's on a shared one.
_POOLER_CONNECT_ARGS: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": _unnamed_statement,
}


def _seconds(key: str, value: str | tuple[str, ...]) -> float:
    try:
        return float(value if isinstance(value, str) else value[-1])
    except ValueError:
        raise DatabaseConfigError(
            f"?{key}= in the database URL must be a number of seconds, got {value!r}: "
            f"write e.g. ?{key}=10, or pass connect_args={{'{key}': 10}} to init()"
        ) from None


class AsyncpgDriver(Driver):
    """asyncpg, the default driver."""

    name = "asyncpg"
    prepared_statement_prefix = "__asyncpg_"

    def add_connect_defaults(
        self, connect_args: dict[str, Any], url: URL, *, transaction_pooler: bool
    ) -> None:
        for key, seconds in (
            ("timeout", CONNECT_TIMEOUT_SECONDS),
            ("command_timeout", COMMAND_TIMEOUT_SECONDS),
        ):
            # A value in the URL's query reaches asyncpg as a string, which fails every
            # connect ("float + str"): passed on as a number (connect_args win over the
            # query), or refused here.
            in_url = url.query.get(key)
            connect_args.setdefault(key, seconds if in_url is None else _seconds(key, in_url))
        if transaction_pooler:
            for key, value in _POOLER_CONNECT_ARGS.items():
                given = connect_args.get(key, url.query.get(key, value))
                if key != "prepared_statement_name_func" and str(given) != str(value):
                    raise DatabaseConfigError(
                        f"{key}={given!r} contradicts transaction_pooler=True, which needs "
                        f"{key}={value}: a cached prepared statement outlives its "
                        "transaction, and the pooler runs the next one elsewhere; remove it"
                    )
                connect_args.setdefault(key, value)

    def is_closed(self, connection: Any) -> bool:
        closed: bool = connection.is_closed()  # asyncpg saw the socket close
        return closed

    def in_transaction(self, connection: Any) -> bool:
        in_transaction: bool = connection.is_in_transaction()
        return in_transaction

    async def run_simple(self, connection: Any, sql: str, timeout: float) -> None:
        # execute() without arguments uses the simple protocol: one message, no prepare.
        await connection.execute(sql, timeout=timeout)

    async def fetch_value(self, connection: Any, sql: str, timeout: float) -> Any:
        # The extended protocol (asyncpg has no other way to return rows): two round
        # trips the first time, one once its statement cache holds it.
        return await connection.fetchval(sql, timeout=timeout)

    def cut(self, connection: Any) -> None:
        connection.terminate()

    def cancel_sender(self, connection: Any) -> CancelSender | None:
        # asyncpg's own CancelRequest sender. It is private: asyncpg cancels only
        # through a connection still open, and terminate() drops pending cancels.
        try:
            # importlib: asyncpg has no type stubs, and a static import would need
            # them under a host's `mypy --strict`.
            cancel = importlib.import_module("asyncpg.connect_utils")._cancel
            # Read now: terminate() drops the protocol that knows the backend.
            backend = {
                "loop": asyncio.get_running_loop(),
                "addr": connection._addr,
                "params": connection._params,
                "backend_pid": connection._protocol.backend_pid,
                "backend_secret": connection._protocol.backend_secret,
            }
        except (ImportError, AttributeError):
            return None  # another asyncpg: the cut still happens, uncancelled

        async def send() -> None:
            await cancel(**backend)  # a TypeError from another asyncpg is the caller's

        return send

    async def cancels_sent(self, connection: Any, timeout: float) -> None:
        # asyncpg sends a CancelRequest of its own when a statement's task is
        # cancelled, and terminate() abandons it half-sent (private: _cancellations).
        pending = [task for task in getattr(connection, "_cancellations", ()) if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def locate_connect_error(
        self, error: BaseException, where: str, timeout: object
    ) -> Exception | None:
        # asyncpg reports a DNS failure as "Name or service not known" and a connect
        # timeout as a TimeoutError with no message: neither names the server.
        # (asyncio.TimeoutError is TimeoutError from Python 3.11, not before.)
        if isinstance(error, asyncio.TimeoutError):
            return type(error)(
                f"the database at {where} did not answer within {timeout} s "
                "(connect_args['timeout']): check the network path to it and the server's load"
            )
        if not isinstance(error, (ConnectionError, socket.gaierror)):
            return None  # a TLS or authentication error says enough already
        reason = error.strerror or str(error)
        if isinstance(error, socket.gaierror):
            message = (
                f"could not resolve the database host in {where} ({reason}): check the URL's host"
            )
        else:
            message = (
                f"could not connect to the database at {where} ({reason}): check that "
                "the server is running and the URL's host and port"
            )
        # The same class, so `except ConnectionRefusedError` and classify_error still work.
        return type(error)(error.errno, message)

    def sent_by_server(self, error: BaseException) -> bool:
        # asyncpg raises its client-side encoding failures as a DataError carrying
        # SQLSTATE 22000 too; only a message from the server has a severity. The
        # SQLAlchemy adapter's exception wraps asyncpg's as its cause.
        while error is not None:
            if hasattr(error, "severity"):
                return error.severity is not None
            error = error.__cause__  # type: ignore[assignment]
        return False

    def classify(self, error: BaseException) -> DatabaseErrorKind | None:
        # asyncpg's connect errors and its command_timeout reach the caller as bare
        # OSError / TimeoutError: they are the database's only if asyncpg raised them.
        if not isinstance(error, (TimeoutError, asyncio.TimeoutError, OSError)):
            return None
        frames = list(traceback_frames(error.__traceback__))
        if not any(module.partition(".")[0] == "asyncpg" for module, _ in frames):
            return None  # raised by something other than the driver
        if _CONNECT_FRAME in frames:
            # Refused, unresolvable or timed out while connecting: unreachable.
            return DatabaseErrorKind.UNAVAILABLE
        # TimeoutError is an OSError: test it first.
        if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
            return DatabaseErrorKind.TIMEOUT  # command_timeout
        return DatabaseErrorKind.UNAVAILABLE  # the socket failed mid-command

    def failed_to_connect(self, error: BaseException) -> bool:
        # The network's failures reach here as bare OSError or TimeoutError, the
        # server's refusals as PostgresError: all raised inside asyncpg.connect().
        return isinstance(error, Exception) and _CONNECT_FRAME in traceback_frames(
            error.__traceback__
        )


DRIVER = AsyncpgDriver()
