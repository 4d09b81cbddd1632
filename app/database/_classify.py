"""`classify_error`: what kind of database failure an exception is, for retries and status codes.

It reads the SQLSTATE PostgreSQL sent, through SQLAlchemy's wrapper and the
driver's exception, and recognises the failures that carry none (pool
exhaustion, lost connections, and through drivers/ the drivers' bare timeouts and
socket errors).
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Iterator

from sqlalchemy import exc


class DatabaseErrorKind(enum.Enum):
    """What a caller can do about a database error; see `classify_error`."""

    CONFLICT = "conflict"
    """The data's current state refused the write (unique, foreign key, exclusion)."""
    RETRYABLE = "retryable"
    """The transaction lost to a concurrent one and was rolled back: run it again."""
    UNAVAILABLE = "unavailable"
    """No usable connection: database down, unreachable, read-only, or pool exhausted."""
    TIMEOUT = "timeout"
    """A statement, or a wait for a lock, ran out of time."""


# Client-caused violations of the data's state. Not-null (23502) and check
# (23514) violations are left out: they come from values the application should
# have validated, a bug that must surface as one rather than as a "conflict".
_CONFLICT = {
    "23001": "restrict_violation",
    "23503": "foreign_key_violation",
    "23505": "unique_violation",
    "23P01": "exclusion_violation",
}
_RETRYABLE = {
    "40001": "serialization_failure",
    "40P01": "deadlock_detected",
}
_TIMEOUT = {
    "57014": "query_canceled",  # statement_timeout, or pg_cancel_backend()
    "55P03": "lock_not_available",  # lock_timeout, or NOWAIT
}
_UNAVAILABLE = {
    "25006": "read_only_sql_transaction",  # a standby, or a primary demoted by failover
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
}
# Whole SQLSTATE classes: 08 connection exceptions, 53 insufficient resources
# (too many connections, out of memory, disk full).
_UNAVAILABLE_CLASSES = ("08", "53")
# Every SQLSTATE is five characters: anything else in `sqlstate` is not one.
SQLSTATE_LENGTH = 5

_KIND_BY_SQLSTATE = {
    **dict.fromkeys(_CONFLICT, DatabaseErrorKind.CONFLICT),
    **dict.fromkeys(_RETRYABLE, DatabaseErrorKind.RETRYABLE),
    **dict.fromkeys(_TIMEOUT, DatabaseErrorKind.TIMEOUT),
    **dict.fromkeys(_UNAVAILABLE, DatabaseErrorKind.UNAVAILABLE),
}


def classify_error(error: BaseException) -> DatabaseErrorKind | None:
    """The kind of database failure `error` is, or None if it is not one of the four.

    None means a bug or a failure that is not the database's (a plain
    `ValueError`, a syntax error, a not-null violation, a wrong password):
    let it become a 500. It follows SQLAlchemy's `.orig` and explicit causes
    (`raise ... from`), not the implicit context of an error raised while
    handling another, which describes a failure of its own.
    """
    links = list(_chain(error))
    for link in links:
        kind = _kind_of(link)
        if kind is not None:
            return kind
    # Last, as it says less than a driver's own error (a lost connection may have
    # been cut by the driver's statement timeout): SQLAlchemy decided the connection
    # is gone (a server-side kill, a reset socket).
    if any(isinstance(link, exc.DBAPIError) and link.connection_invalidated for link in links):
        return DatabaseErrorKind.UNAVAILABLE
    return None


def failed_to_connect(error: BaseException) -> bool:
    """Whether `error` (or a link of its chain) is a new connection that failed.

    The server unreachable or refusing the login, a missing database and bad
    credentials included, which `classify_error` leaves unclassified. Only the
    driver can tell: psycopg reports a refused login with no SQLSTATE.
    """
    drivers = importlib.import_module(".drivers", __package__)
    return any(
        driver.failed_to_connect(link) for link in _chain(error) for driver in drivers.imported()
    )


def sqlstate_of(error: BaseException) -> str | None:
    """The first SQLSTATE in `error`'s chain (`.orig` and causes); None if none."""
    for link in _chain(error):
        sqlstate = _sqlstate(link)
        if sqlstate is not None:
            return sqlstate
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        link = pending.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        # .orig: SQLAlchemy's DBAPIError wraps the driver's error (or its adapter).
        for nested in (getattr(link, "orig", None), link.__cause__):
            if isinstance(nested, BaseException):
                pending.append(nested)


def _kind_of(error: BaseException) -> DatabaseErrorKind | None:
    # sqlalchemy.exc.TimeoutError is raised by the pool only: no connection became
    # free within pool_timeout (PoolExhaustedError is a subclass).
    if isinstance(error, (exc.TimeoutError, exc.DisconnectionError)):
        return DatabaseErrorKind.UNAVAILABLE
    sqlstate = _sqlstate(error)
    if sqlstate is not None:
        kind = _KIND_BY_SQLSTATE.get(sqlstate)
        if kind is None and sqlstate[:2] in _UNAVAILABLE_CLASSES:
            kind = DatabaseErrorKind.UNAVAILABLE
        if kind is not None:
            return kind
    # Failures the driver raises without a SQLSTATE (bare connect errors, its own
    # statement timeout), which only the driver can tell apart from the app's own.
    # Looked up at call time: the drivers import this module.
    drivers = importlib.import_module(".drivers", __package__)
    for driver in drivers.in_use():
        driver_kind: DatabaseErrorKind | None = driver.classify(error)
        if driver_kind is not None:
            return driver_kind
    return None


def _sqlstate(error: BaseException) -> str | None:
    # asyncpg's errors and SQLAlchemy's asyncpg adapter carry `sqlstate`;
    # psycopg's carry `sqlstate`, psycopg2's `pgcode`.
    for attribute in ("sqlstate", "pgcode"):
        value = getattr(error, attribute, None)
        if isinstance(value, str) and len(value) == SQLSTATE_LENGTH:
            return value
    return None
