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

from ._errors import TransactionAbortedError
from .drivers import Driver

# Kept in Connection.info, which belongs to the pooled DBAPI connection; it is
# cleared whenever a transaction begins, so it never outlives one transaction.
_FAILED = "app.database.statement_failed"


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
            # Only an error PostgreSQL sent aborted the transaction: not one the
            # driver raised before sending, nor a statement the package refused.
            and driver.sent_by_server(context.original_exception)
        ):
            connection.info[_FAILED] = True

    event.listen(engine, "begin", _forget_failure)
    event.listen(engine, "rollback_savepoint", _forget_failure)
    event.listen(engine, "handle_error", remember_failure)
    event.listen(engine, "commit", _refuse_failed_commit)


def _forget_failure(connection: Connection, *_: Any) -> None:
    # Rolling back to a savepoint taken before the error heals the transaction.
    connection.info.pop(_FAILED, None)


def _refuse_failed_commit(connection: Connection) -> None:
    if connection.info.pop(_FAILED, False):
        # SQLAlchemy marks the transaction finished even when its commit raises, and
        # then skips the pool's reset: end the aborted transaction here, or the next
        # checkout would inherit it.
        connection.engine.dialect.do_rollback(connection.connection)
        raise TransactionAbortedError(_ABORTED)


class GuardedSession(Session):
    """The sync class of the package's sessions, so that its commit check stays theirs."""


def _connections_of(transaction: SessionTransaction) -> Iterable[Connection]:
    connections: Iterable[Connection] | None = getattr(transaction, "connections", None)
    if connections is None:  # SQLAlchemy < 2.1.7 has no public accessor
        connections = [entry[0] for entry in transaction._connections.values()]
    return connections


@event.listens_for(GuardedSession, "before_commit")
def _refuse_aborted_unit_of_work(session: Session) -> None:
    # Checked before the session starts committing, so that a refusal leaves its
    # transaction (or, in test isolation, its savepoint) to be rolled back normally.
    transaction = session.get_transaction()
    if transaction is not None and any(
        connection.info.get(_FAILED) for connection in _connections_of(transaction)
    ):
        raise TransactionAbortedError(_ABORTED)


_ABORTED = (
    "a statement in this transaction failed and its error was caught; PostgreSQL "
    "aborts a transaction at its first error, so COMMIT would silently discard "
    "its work: let the error propagate, or call `await session.rollback()` and "
    "start again, or run the statement that may fail inside "
    "`async with session.begin_nested():`"
)
