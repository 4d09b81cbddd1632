"""Exceptions raised by the package when it is misused or misconfigured."""

from __future__ import annotations


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
