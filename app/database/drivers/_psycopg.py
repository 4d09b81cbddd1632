"""psycopg 3: the same guarantees as asyncpg, through psycopg's public hooks where it has them.

psycopg has no client-side statement timeout: connections are made from a
subclass whose every wait on the server (statements, COMMIT, ROLLBACK) is
bounded by `command_timeout`; a statement that overruns gets a CancelRequest
and its connection is cut, as asyncpg's `command_timeout` does. This module is
imported only for `postgresql+psycopg://` engines, so psycopg is imported freely.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
from typing import Any

import psycopg
from psycopg import errors, generators, waiting
from sqlalchemy.engine import URL

from .._classify import DatabaseErrorKind
from .._closing import CANCEL_TIMEOUT_SECONDS, POOLER_CANCEL_TIMEOUT_SECONDS, bounded
from .._errors import DatabaseConfigError
from ._base import (
    COMMAND_TIMEOUT_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    CancelSender,
    Driver,
    traceback_frames,
)

_STATUS = psycopg.pq.TransactionStatus
# The frames every new psycopg connection passes through: `connect()` of
# AsyncConnection (the package's engines) or Connection (a sync engine's).
_CONNECT_FRAMES = {("psycopg.connection_async", "connect"), ("psycopg.connection", "connect")}
# libpq counts connect_timeout in whole seconds, 2 at least.
_MIN_CONNECT_TIMEOUT = 2


class CommandTimeoutError(psycopg.OperationalError):
    """A wait on the server outlasted `command_timeout`; the connection was cut."""


class BoundedConnection(psycopg.AsyncConnection[Any]):
    """A psycopg connection whose waits on the server end after `command_timeout`."""

    command_timeout: float | None = COMMAND_TIMEOUT_SECONDS
    # How long its CancelRequest may take: longer behind a pooler (_closing.py).
    cancel_timeout: float = CANCEL_TIMEOUT_SECONDS
    _waits = 0  # waits in progress: a cut must not close the socket under one
    _cut = False

    async def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        self._waits += 1
        try:
            # Not super().wait(): on a cancellation, psycopg's sends a CancelRequest and
            # waits for the server (up to 5 s + 5 s) before letting it through; a cancel
            # scope that cancels again (anyio, Starlette) interrupts that before the
            # request is out, and psycopg closes the connection with a warning while the
            # backend runs its statement on. Let through at once, a cancellation makes
            # SQLAlchemy discard the connection, and the pool's terminate sends the
            # CancelRequest and cuts, bounded, in the order a pooler needs (_closing.py).
            bound = self.command_timeout if timeout is None else timeout
            return await waiting.wait_async(
                gen, self.pgconn.socket, interval=interval, timeout=bound
            )
        except errors.OperationalError as error:
            # psycopg's own wait timeout (a private subclass), and only where the bound
            # is ours: a caller's own (notifies(timeout=...)) ends its wait as psycopg says.
            if type(error).__name__ != "_WaitTimeout" or timeout is not None:
                raise
            # The CancelRequest first, then the cut: through a transaction pooler the
            # cancel is forwarded only while this client's connection is open.
            self._cut = True
            # Once: this statement has run for command_timeout, so it is running.
            send_cancel = DRIVER.cancel_sender(self)
            if send_cancel is not None:
                await bounded(send_cancel(), self.cancel_timeout)
            _shutdown(self)
            raise CommandTimeoutError(
                f"the server did not answer within {self.command_timeout} s "
                "(connect_args['command_timeout']); the statement was cancelled and the "
                "connection closed: check for locks, slow queries or a stalled network"
            ) from None
        finally:
            self._waits -= 1
            if self._cut and not self._waits:
                self.pgconn.finish()  # nobody waits on the socket any more


def _shutdown(connection: psycopg.AsyncConnection[Any]) -> None:
    # shutdown(), not close(): a coroutine waiting on this socket wakes up to an
    # end of file instead of waiting on a closed descriptor forever.
    with contextlib.suppress(OSError):
        fd = os.dup(connection.pgconn.socket)
        with socket.socket(fileno=fd) as duplicate:
            duplicate.shutdown(socket.SHUT_RDWR)


def _connector(command_timeout: float | None, cancel_timeout: float) -> Any:
    async def connect(*args: Any, **kwargs: Any) -> BoundedConnection:
        try:
            connection = await BoundedConnection.connect(*args, **kwargs)
        except asyncio.CancelledError as error:
            # psycopg re-raises from a frame that still holds the connection it was
            # making (cancelled mid-handshake): without that frame the socket closes
            # now, not whenever the exception is freed (a log record may keep it;
            # measured: 7-11 of 200 cancelled connects left a backend open).
            error.with_traceback(None)
            raise
        connection.command_timeout = command_timeout
        connection.cancel_timeout = cancel_timeout
        return connection

    return connect


class PsycopgDriver(Driver):
    """psycopg 3 (`postgresql+psycopg://`)."""

    name = "psycopg"
    prepared_statement_prefix = "_pg3_"

    def add_connect_defaults(
        self, connect_args: dict[str, Any], url: URL, *, transaction_pooler: bool
    ) -> None:
        if "connect_timeout" not in url.query:
            seconds = max(_MIN_CONNECT_TIMEOUT, round(CONNECT_TIMEOUT_SECONDS))
            connect_args.setdefault("connect_timeout", seconds)
        if "async_creator_fn" in connect_args:
            raise DatabaseConfigError(
                "connect_args['async_creator_fn'] would replace the package's bounded "
                "psycopg connections: to set per-connection values (a rotating token), "
                "listen for SQLAlchemy's 'do_connect' event on "
                "session_manager.engine.sync_engine and update its cparams"
            )
        command_timeout = connect_args.pop("command_timeout", COMMAND_TIMEOUT_SECONDS)
        cancel_timeout = (
            POOLER_CANCEL_TIMEOUT_SECONDS if transaction_pooler else CANCEL_TIMEOUT_SECONDS
        )
        connect_args["async_creator_fn"] = _connector(command_timeout, cancel_timeout)
        if transaction_pooler:
            # psycopg prepares a statement on the server after 5 executions; through a
            # pooler the next transaction may run where it does not exist, or exists.
            given = connect_args.setdefault("prepare_threshold", None)
            if given is not None:
                raise DatabaseConfigError(
                    f"prepare_threshold={given!r} contradicts transaction_pooler=True, which "
                    "needs prepare_threshold=None: a prepared statement outlives its "
                    "transaction, and the pooler runs the next one elsewhere; remove it"
                )

    def is_closed(self, connection: Any) -> bool:
        closed: bool = connection.closed
        return closed

    def has_pending_input(self, connection: Any) -> bool:
        # psycopg reads only when asked, so a connection the server closed while it
        # sat in the pool still looks open; what the server sent then is unread.
        # poll(), not select(): select() fails on descriptors past 1023.
        try:
            poller = select.poll()
            poller.register(connection.pgconn.socket, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError, psycopg.Error):
            return True  # cannot tell: let the ping decide

    def in_transaction(self, connection: Any) -> bool:
        # Anything but IDLE (between transactions) or UNKNOWN (connection gone).
        status = connection.pgconn.transaction_status
        return status in (_STATUS.INTRANS, _STATUS.INERROR, _STATUS.ACTIVE)

    async def run_simple(self, connection: Any, sql: str, timeout: float) -> None:
        await self._execute(connection, sql, timeout, fetch=False)

    async def fetch_value(self, connection: Any, sql: str, timeout: float) -> Any:
        return await self._execute(connection, sql, timeout, fetch=True)

    async def _execute(self, connection: Any, sql: str, timeout: float, *, fetch: bool) -> Any:
        # Without parameters and prepare=False psycopg sends one simple Query message;
        # in autocommit mode, without a BEGIN of its own first (which would put the
        # reset inside a transaction that the pool's rollback then undoes). Inside a
        # transaction already (left open by a connect listener), it runs in that one.
        usual_timeout = getattr(connection, "command_timeout", None)
        if isinstance(connection, BoundedConnection):
            # Bounded by the connection's own timeout, which cuts it cleanly on expiry.
            connection.command_timeout = min(usual_timeout or timeout, timeout)
        # Switched to autocommit, and back, only if it is not in autocommit already (a
        # read-only unit's connection): client-side only, as the connection is idle.
        idle = connection.pgconn.transaction_status == _STATUS.IDLE and not connection.autocommit
        if idle:
            await connection.set_autocommit(True)
        try:
            async with connection.cursor() as cursor:
                if isinstance(connection, BoundedConnection):
                    # Bounded above. Not asyncio.wait_for(), which before Python 3.12
                    # returns the result instead of raising a cancellation that arrives
                    # as the statement ends: the cancelled unit of work would run on.
                    await cursor.execute(sql, prepare=False)
                else:
                    await asyncio.wait_for(cursor.execute(sql, prepare=False), timeout * 2)
                row = await cursor.fetchone() if fetch else None
                return None if row is None else row[0]
        finally:
            # Not after a cancellation that left the statement running (ACTIVE): psycopg
            # would raise, replacing the cancellation; the caller discards the connection.
            if idle and connection.pgconn.transaction_status == _STATUS.IDLE:
                await connection.set_autocommit(False)
            if isinstance(connection, BoundedConnection):
                connection.command_timeout = usual_timeout

    def cut(self, connection: Any) -> None:
        if isinstance(connection, BoundedConnection) and connection._waits:
            connection._cut = True  # its wait closes the connection once it wakes
            _shutdown(connection)
        else:
            connection.pgconn.finish()

    def cancel_sender(self, connection: Any) -> CancelSender | None:
        try:
            # libpq >= 17. A copy of what the backend needs, which outlives the
            # connection's finish(), and which reset() makes ready for another request.
            cancel_connection = connection.pgconn.cancel_conn()
        except (psycopg.Error, AttributeError):
            return None
        used = False

        async def send() -> None:
            nonlocal used
            if used:
                cancel_connection.reset()  # closes the previous request's socket
            used = True
            try:
                cancel_connection.start()
                await waiting.wait_conn_async(generators.cancel(cancel_connection))
            except BaseException:
                # No repeat follows a request that failed or timed out: its socket
                # closes now, not whenever an exception that holds this is freed.
                cancel_connection.finish()
                raise

        return send

    def locate_connect_error(
        self, error: BaseException, where: str, timeout: object
    ) -> Exception | None:
        # libpq names the server in its own words, or (DNS, timeout) not at all:
        # worded as for asyncpg, so that one message names every driver's failure.
        if not isinstance(error, psycopg.OperationalError) or error.sqlstate is not None:
            return None
        if isinstance(error, errors.ConnectionTimeout):
            return type(error)(
                f"the database at {where} did not answer within {timeout} s "
                "(connect_args['connect_timeout']): check the network path to it and "
                "the server's load"
            )
        message = str(error)
        if message.startswith("failed to resolve host"):
            reason = message.rpartition("] ")[2] or message
            return type(error)(
                f"could not resolve the database host in {where} ({reason}): check the URL's host"
            )
        reason = message.rpartition(" failed: ")[2].partition("\n")[0].strip()
        if not reason or reason.startswith("FATAL"):
            return None  # the server answered (authentication, no such database): said enough
        return type(error)(
            f"could not connect to the database at {where} ({reason}): check that the "
            "server is running and the URL's host and port"
        )

    def classify(self, error: BaseException) -> DatabaseErrorKind | None:
        if isinstance(error, CommandTimeoutError):
            return DatabaseErrorKind.TIMEOUT
        if not isinstance(error, psycopg.OperationalError) or error.sqlstate is not None:
            return None
        # No SQLSTATE: libpq's own failures. The network's (refused, unresolvable,
        # timed out, lost mid-command) are outages; a server that refused the login
        # (FATAL) is one only when it is full or not up yet. Authentication, a missing
        # database, pg_hba, a bad setting: configuration, left to be a 500.
        message = str(error)
        if "FATAL" not in message or any(sign in message for sign in _SERVER_NOT_READY):
            return DatabaseErrorKind.UNAVAILABLE
        return None

    def failed_to_connect(self, error: BaseException) -> bool:
        # Refused, unresolvable, timed out or turned away by the server: psycopg
        # raises each as an OperationalError from connect(), with no SQLSTATE (libpq
        # keeps only the message of a refused login, e.sqlstate and e.diag are None).
        return isinstance(error, psycopg.OperationalError) and not _CONNECT_FRAMES.isdisjoint(
            traceback_frames(error.__traceback__)
        )


# What PostgreSQL says when it refuses a login it would take later.
_SERVER_NOT_READY = (
    "too many clients",
    "too many connections",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
)


DRIVER = PsycopgDriver()
