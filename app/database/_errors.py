"""Exceptions raised by the package when it is misused, misconfigured or overloaded."""

from __future__ import annotations

from sqlalchemy import exc


class DatabaseNotInitializedError(RuntimeError):
    """The session manager was used before `init()` or after `close()`."""


class DatabaseAlreadyInitializedError(RuntimeError):
    """`init()` was called on a session manager that is already open."""


class DatabaseConfigError(ValueError):
    """`init()` was given a URL or engine option it cannot safely use.

    Messages never contain the URL's password.
    """


class TransactionAbortedError(RuntimeError):
    """COMMIT was attempted after a statement in the same transaction had failed."""


class ReadOnlyTransactionError(RuntimeError):
    """A read-only unit of work sent a write, which the server refused (SQLSTATE 25006).

    Nothing was written; its `__cause__` is the refused statement.
    """


class CommitOutcomeUnknownError(RuntimeError):
    """The connection was lost, or timed out, after COMMIT was sent: it may have committed.

    Its `__cause__` is the driver's failure. Never retried by the package: running
    the work again could apply it twice.
    """


class TransactionPoolerError(RuntimeError):
    """A statement cannot work behind a transaction pooler, or one is in the way.

    Raised before sending a session-level statement under `transaction_pooler=True`,
    and for a pooler's prepared-statement clash without it.
    """


class PoolExhaustedError(exc.TimeoutError):
    """No pooled connection became free within `pool_timeout`.

    A subclass of `sqlalchemy.exc.TimeoutError`, so existing handlers still catch it.
    """
