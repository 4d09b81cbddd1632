"""What the package needs from a PostgreSQL driver: one subclass per driver.

The core (liveness, session-state reset, prompt close, connection errors, error
classification, transaction-pooler mode) talks to drivers only through this
interface, so supporting another driver means adding one module beside this one.
`connection` below is always the driver's own connection object
(`dbapi_connection.driver_connection`), never SQLAlchemy's adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any

from sqlalchemy.engine import URL

from .._classify import SQLSTATE_LENGTH, DatabaseErrorKind

# Each call sends one CancelRequest (a packet on a connection of its own).
CancelSender = Callable[[], Coroutine[Any, Any, None]]

# The waits every driver bounds by default (README, "Timeouts"): connecting, one
# statement, and (SQLAlchemy's, driver-independent) a free pooled connection.
CONNECT_TIMEOUT_SECONDS = 5.0
COMMAND_TIMEOUT_SECONDS = 30.0


class Driver:
    """One PostgreSQL driver, as the package's guarantees need it."""

    name: str = ""
    """SQLAlchemy's name for it: the part after '+' in the URL's scheme."""

    def add_connect_defaults(
        self, connect_args: dict[str, Any], url: URL, *, transaction_pooler: bool
    ) -> None:
        """Set bounded timeouts (and pooler-safe settings) in `connect_args`, in place.

        A value the caller passed, in `connect_args` or the URL's query, is kept;
        one that contradicts `transaction_pooler` raises `DatabaseConfigError`.
        """
        raise NotImplementedError

    def is_closed(self, connection: Any) -> bool:
        """Whether the connection is visibly dead, found without any I/O."""
        raise NotImplementedError

    def has_pending_input(self, connection: Any) -> bool:
        """Whether the server sent something the driver has not read yet (no I/O).

        A driver that reads continuously (asyncpg) has seen it already: False.
        """
        return False

    def in_transaction(self, connection: Any) -> bool:
        """Whether the server side holds an open transaction for this connection."""
        raise NotImplementedError

    async def run_simple(self, connection: Any, sql: str, timeout: float) -> None:
        """Send `sql` (one or more statements) as one simple-protocol message, bounded."""
        raise NotImplementedError

    async def fetch_value(self, connection: Any, sql: str, timeout: float) -> Any:
        """The first column of the first row `sql` returns (None if none), bounded.

        Outside a transaction it runs in one of its own; inside one, in that one.
        """
        raise NotImplementedError

    def cut(self, connection: Any) -> None:
        """Drop the connection at once, without waiting for the server to answer."""
        raise NotImplementedError

    def cancel_sender(self, connection: Any) -> CancelSender | None:
        """A function whose every call returns a coroutine sending PostgreSQL's
        CancelRequest for `connection`'s backend.

        Built now, while the connection still knows its backend; called later, once
        per request (after the connection is cut, too). Calling it never raises: its
        coroutine does. None when the driver cannot build one.
        """
        raise NotImplementedError

    async def cancels_sent(self, connection: Any, timeout: float) -> None:
        """Wait (at most `timeout` s) for CancelRequests the driver itself is sending."""

    def locate_connect_error(
        self, error: BaseException, where: str, timeout: object
    ) -> Exception | None:
        """The same failure, re-raised with the server's `where` (host:port) named.

        None when `error` is not a network failure or already names the server.
        """
        raise NotImplementedError

    def classify(self, error: BaseException) -> DatabaseErrorKind | None:
        """The kind of a driver failure that carries no SQLSTATE, or None."""
        raise NotImplementedError

    def failed_to_connect(self, error: BaseException) -> bool:
        """Whether the driver raised `error` opening a connection, whatever the reason.

        The server unreachable, or refusing the login (no such database,
        authentication, too many clients), with a SQLSTATE or, as libpq reports
        a refused login, without one.
        """
        raise NotImplementedError

    def sent_by_server(self, error: BaseException) -> bool:
        """Whether PostgreSQL sent `error` (so it aborted the transaction).

        An error the driver raised before sending anything (a value it cannot
        encode) leaves the transaction usable.
        """
        sqlstate = getattr(error, "sqlstate", None)
        return isinstance(sqlstate, str) and len(sqlstate) == SQLSTATE_LENGTH

    prepared_statement_prefix: str = ""
    """How the driver names the statements it prepares, e.g. `__asyncpg_stmt_`."""

    def is_prepared_statement_clash(self, error: BaseException) -> bool:
        """Whether `error` is one of the driver's prepared statements missing or duplicated.

        The sign of a transaction pooler in the way; the application's own SQL
        `EXECUTE` or `PREPARE` failing the same way is not.
        """
        sqlstate = getattr(error, "sqlstate", None)
        # 26000 invalid_sql_statement_name ("does not exist"), 42P05
        # duplicate_prepared_statement ("already exists").
        return (
            sqlstate in ("26000", "42P05")
            and bool(self.prepared_statement_prefix)
            and f'prepared statement "{self.prepared_statement_prefix}' in str(error)
        )


def traceback_frames(traceback: TracebackType | None) -> Iterator[tuple[str, str]]:
    """(module, function) of each frame of `traceback`, outermost first."""
    while traceback is not None:
        frame = traceback.tb_frame
        yield frame.f_globals.get("__name__", ""), frame.f_code.co_name
        traceback = traceback.tb_next
