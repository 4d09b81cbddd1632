"""Refuse to COMMIT a transaction in which a statement already failed.

PostgreSQL aborts a transaction at its first error and answers a later COMMIT
with a ROLLBACK, not an error. Code that catches a database error and carries
on would otherwise report success (a 2xx) for work that was thrown away.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.pool import ConnectionPoolEntry

from ._errors import TransactionAbortedError
from .drivers import Driver

# The transaction's first failed statement, kept in Connection.info (which belongs to
# the pooled DBAPI connection) to be the refusal's cause. It holds the exception's
# traceback, and so its frames: dropped when the transaction ends (COMMIT, ROLLBACK,
# or a rollback to a savepoint, which heals it) and, in case, when one begins.
_FAILED = "app.database.first_failure"


def install_commit_guard(engine: Engine, driver: Driver) -> None:
    """Make `engine` raise `TransactionAbortedError` instead of a silent failed COMMIT.

    PostgreSQL only (its drivers are the ones in drivers/): SQLite and MySQL keep a
    transaction usable after an error.
    """

    def remember_failure(context: ExceptionContext) -> None:
        connection = context.connection
        if (
            connection is not None
            and not context.is_disconnect
            and connection.in_transaction()
            # In autocommit (a read-only unit) each statement is a transaction of its
            # own: a failed one aborts nothing that a later COMMIT could lose.
            and connection.get_execution_options().get("isolation_level") != "AUTOCOMMIT"
            # Only an error PostgreSQL sent aborted the transaction: not one the
            # driver raised before sending, nor a statement the package refused.
            and driver.sent_by_server(context.original_exception)
        ):
            # SQLAlchemy's wrapper, which names the statement (its parameters hidden
            # under hide_parameters) and keeps the driver's error as `.orig`. The first
            # failure only: later statements fail because the transaction is aborted.
            connection.info.setdefault(
                _FAILED, context.sqlalchemy_exception or context.original_exception
            )

    event.listen(engine, "begin", _forget_failure)
    event.listen(engine, "rollback", _forget_failure)
    event.listen(engine, "rollback_savepoint", _forget_failure)
    # A connection lost mid-transaction is rolled back without one to reach the info
    # through; its pool entry keeps that info until it reconnects.
    event.listen(engine, "invalidate", _forget_failure_of_entry)
    event.listen(engine, "handle_error", remember_failure)
    event.listen(engine, "commit", _refuse_failed_commit)


def _forget_failure(connection: Connection, *_: Any) -> None:
    # Rolling back to a savepoint taken before the error heals the transaction.
    if not (connection.invalidated or connection.closed):  # else .info would raise
        connection.info.pop(_FAILED, None)


def _forget_failure_of_entry(_: Any, entry: ConnectionPoolEntry, *__: Any) -> None:
    entry.info.pop(_FAILED, None)


def _refuse_failed_commit(connection: Connection) -> None:
    failure: BaseException | None = connection.info.pop(_FAILED, None)
    if failure is not None:
        # SQLAlchemy marks the transaction finished even when its commit raises, and
        # then skips the pool's reset: end the aborted transaction here, or the next
        # checkout would inherit it.
        connection.engine.dialect.do_rollback(connection.connection)
        # Its cause: the statement that failed, and classify_error's answer.
        raise TransactionAbortedError(_ABORTED) from failure


class GuardedSession(Session):
    """The sync class of the package's sessions, so that its commit check stays theirs."""


def _connections_of(transaction: SessionTransaction) -> Iterable[Connection]:
    connections: Iterable[Connection] | None = getattr(transaction, "connections", None)
    # SQLAlchemy < 2.1.7 has no public accessor. `make mutation` runs on the lock's 2.1,
    # where this fallback never runs: `make test-sqlalchemy-2.0` is what pins it.
    if connections is None:  # pragma: no mutate
        connections = [entry[0] for entry in transaction._connections.values()]  # pragma: no mutate
    return connections


@event.listens_for(GuardedSession, "before_commit")
def _refuse_aborted_unit_of_work(session: Session) -> None:
    # Checked before the session starts committing, so that a refusal leaves its
    # transaction (or, in test isolation, its savepoint) to be rolled back normally.
    transaction = session.get_transaction()
    if transaction is None:
        return
    for connection in _connections_of(transaction):
        failure: BaseException | None = connection.info.get(_FAILED)
        if failure is not None:
            raise TransactionAbortedError(_ABORTED) from failure


_ABORTED = (
    "a statement in this transaction failed and its error was caught; PostgreSQL "
    "aborts a transaction at its first error, so COMMIT would silently discard "
    "its work: let the error propagate, or call `await session.rollback()` and "
    "start again, or run the statement that may fail inside "
    "`async with session.begin_nested():`"
)
