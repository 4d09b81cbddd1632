"""Read-only units of work at one round trip per statement.

A read-only transaction costs BEGIN READ ONLY, the statement and COMMIT: three
round trips for a one-row read. A unit of work that only reads needs no
transaction of its own: under READ COMMITTED each statement takes its own
snapshot anyway, so running each as its own implicit transaction (autocommit)
reads exactly what the transaction would have. The server still enforces
read-only: the connection's session default is `READ ONLY`, so a write fails
with SQLSTATE 25006 and nothing is written.

The mode is a property of the pooled connection, switched only when a unit of
work meets a connection last used by the other kind (one round trip), so read
and write units share the pool, and its size, that the caller configured.
SQLite (the demo's embedded default) gets the same behaviour from
`PRAGMA query_only`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.pool import PoolProxiedConnection
from sqlalchemy.util import await_only

from ._classify import sqlstate_of
from ._errors import DatabaseConfigError, ReadOnlyTransactionError
from ._guards import GuardedSession
from .drivers import Driver

# The execution option saying what a connection is for: absent for a read-write
# unit, READ_ONLY for a read-only one in autocommit (the connection's session
# default must be read-only), READ_ONLY_TRANSACTION for one in a BEGIN READ ONLY
# transaction and ANY for the package's own one-statement reads (either default).
UNIT_OPTION = "app_database_unit"
READ_ONLY = "read_only"
READ_ONLY_TRANSACTION = "read_only_transaction"
ANY = "any"
# Set in a pooled connection's `info` while its session default is READ ONLY.
# The session-state reset (RESET ALL) puts it back to READ WRITE and drops the mark.
READ_ONLY_DEFAULT = "app.database.read_only_default"
# Marks a read-only unit's connection for the 25006 translation (joined test sessions,
# whose read-only-ness is a SET TRANSACTION inside the test's transaction, included).
_READ_ONLY_UNIT = "app.database.read_only_unit"
_SWITCH_TIMEOUT_SECONDS = 5.0
_SWITCH = {
    True: "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    False: "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
}


def read_only_options() -> dict[str, Any]:
    """Execution options for a read-only unit of work run in autocommit."""
    return {"isolation_level": "AUTOCOMMIT", UNIT_OPTION: READ_ONLY}


def read_only_transaction_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` (with postgresql_readonly) for a read-only unit in one transaction."""
    return {**options, UNIT_OPTION: READ_ONLY_TRANSACTION}


def any_mode_options() -> dict[str, Any]:
    """Execution options for one read of the package's own, in autocommit, either mode."""
    return {"isolation_level": "AUTOCOMMIT", UNIT_OPTION: ANY}


# Sets a checked-out connection's session default to read-only (True) or read-write.
Switch = Callable[[PoolProxiedConnection, bool], None]


def postgresql_switch(driver: Driver) -> Switch:
    def switch(connection: PoolProxiedConnection, read_only: bool) -> None:
        # Through the driver, not a cursor, so the session-state tracking does not count
        # it as a change to reset: the next unit of the other kind undoes it.
        sql = _SWITCH[read_only]
        await_only(driver.run_simple(connection.driver_connection, sql, _SWITCH_TIMEOUT_SECONDS))

    return switch


def sqlite_switch(connection: PoolProxiedConnection, read_only: bool) -> None:
    cursor = connection.cursor()
    try:
        cursor.execute(f"PRAGMA query_only = {int(read_only)}")
    finally:
        cursor.close()


def install_read_only_errors(engine: Engine) -> None:
    """Raise a write refused in a read-only unit of work as `ReadOnlyTransactionError`."""
    event.listen(engine, "handle_error", _explain_read_only_write)


def install_read_only_mode(engine: Engine, switch: Switch) -> None:
    """Give each unit of work a connection whose session default suits it."""

    def match_session_default(connection: Connection) -> None:
        unit = connection.get_execution_options().get(UNIT_OPTION)
        if unit not in (None, READ_ONLY):
            return
        wanted = unit == READ_ONLY
        if bool(connection.info.get(READ_ONLY_DEFAULT)) == wanted:
            return  # the common case under a steady mix: no round trip
        try:
            switch(connection.connection, wanted)
        except BaseException as error:
            # Raising here leaves the Connection unbuilt: its pooled connection would
            # stay checked out until garbage-collected. Invalidated, it goes back now
            # (also when cancelled: its state is unknown).
            connection.connection.invalidate(error if isinstance(error, Exception) else None)
            if not isinstance(error, Exception):
                raise
            # A connection-level failure, whatever the driver raised: typed as one, so
            # that a replica's read moves to the primary and classify_error knows it.
            raise DisconnectionError(
                f"setting the connection's read-only default failed: {type(error).__name__}"
            ) from error
        if wanted:
            connection.info[READ_ONLY_DEFAULT] = True
        else:
            connection.info.pop(READ_ONLY_DEFAULT, None)

    event.listen(engine, "engine_connect", match_session_default)


# Marks the package's own statements, which `testing.count_queries` leaves out.
INTERNAL_OPTION = "app_database_internal"


@asynccontextmanager
async def read_only_savepoint(session: AsyncSession) -> AsyncIterator[None]:
    """Make `session`'s current savepoint read-only while the block runs.

    For a session joined to a test's open transaction, whose level cannot change:
    read-only can, inside a savepoint, which ends it (RELEASE restores read-write;
    SQLite's `query_only` is switched back here). So a write in a read-only unit
    fails in tests as in production, with the same error.
    """
    internal = {INTERNAL_OPTION: True}
    sqlite = session.get_bind().dialect.name == "sqlite"
    start = "PRAGMA query_only = 1" if sqlite else "SET TRANSACTION READ ONLY"
    await session.execute(text(start), execution_options=internal)
    connection = (await session.connection()).sync_connection
    if connection is None:
        raise RuntimeError("the session has no connection")
    connection.info[_READ_ONLY_UNIT] = True
    try:
        yield
    finally:
        if not (connection.invalidated or connection.closed):
            connection.info.pop(_READ_ONLY_UNIT, None)
            if sqlite:
                await session.execute(text("PRAGMA query_only = 0"), execution_options=internal)


# In the `info` of a read-only unit's session run in autocommit.
AUTOCOMMIT_READS = "app.database.autocommit_reads"
# What streaming asks for: a server-side cursor, which lives only inside a transaction.
_STREAMING_OPTIONS = ("stream_results", "yield_per")


class ReadOnlySession(GuardedSession):
    """The sync session of a read-only unit: refuses streaming where there is no transaction."""

    def _execute_internal(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
        if self.info.get(AUTOCOMMIT_READS):
            options = dict(getattr(statement, "get_execution_options", dict)())
            options.update(kwargs.get("execution_options") or {})
            if any(options.get(name) for name in _STREAMING_OPTIONS):
                raise DatabaseConfigError(
                    "streaming (session.stream(), yield_per, stream_results) needs a "
                    "server-side cursor, which lives in a transaction, and this read-only "
                    "unit runs each statement on its own: pass an isolation_level to "
                    "session(read_only=True, isolation_level='REPEATABLE READ'), which "
                    "makes it one transaction"
                )
        return super()._execute_internal(statement, *args, **kwargs)


def _explain_read_only_write(context: ExceptionContext) -> None:
    if not _refused_as_read_only(context.original_exception):
        return
    connection = context.connection
    if connection is None or connection.invalidated or connection.closed:
        return
    unit = connection.get_execution_options().get(UNIT_OPTION)
    if unit not in (READ_ONLY, READ_ONLY_TRANSACTION) and not connection.info.get(_READ_ONLY_UNIT):
        # A read-write unit refused: the server is a standby (a failover demoted it).
        return
    raise ReadOnlyTransactionError(
        "this unit of work is read-only (session(read_only=True) or ReadSessionDep) and "
        "the server refused a write in it; nothing was written: write through "
        "AsyncSessionDep or session_manager.session() instead"
    ) from context.sqlalchemy_exception or context.original_exception


def _refused_as_read_only(error: BaseException) -> bool:
    # SQLite: SQLITE_READONLY, "attempt to write a readonly database".
    return sqlstate_of(error) == "25006" or getattr(error, "sqlite_errorname", None) == (
        "SQLITE_READONLY"
    )
