"""`classify_error` without a server: the SQLSTATE table, and what it must not claim.

Each failure is also provoked on real PostgreSQL in
tests/integration/test_error_types.py; these cover the codes a test cannot
easily make a server send (shutdowns, resource limits) and non-database errors.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from app.database import DatabaseErrorKind, classify_error
from app.database._classify import sqlstate_of

CONFLICT, RETRYABLE = DatabaseErrorKind.CONFLICT, DatabaseErrorKind.RETRYABLE
UNAVAILABLE, TIMEOUT = DatabaseErrorKind.UNAVAILABLE, DatabaseErrorKind.TIMEOUT


# asyncpg's own classes, as SQLAlchemy 2.0 lets its connect errors through unwrapped.
@pytest.mark.parametrize(
    ("error_class", "kind"),
    [
        (asyncpg.UniqueViolationError, CONFLICT),  # 23505
        (asyncpg.ForeignKeyViolationError, CONFLICT),  # 23503
        (asyncpg.ExclusionViolationError, CONFLICT),  # 23P01
        (asyncpg.RestrictViolationError, CONFLICT),  # 23001
        (asyncpg.SerializationError, RETRYABLE),  # 40001
        (asyncpg.DeadlockDetectedError, RETRYABLE),  # 40P01
        (asyncpg.QueryCanceledError, TIMEOUT),  # 57014
        (asyncpg.LockNotAvailableError, TIMEOUT),  # 55P03
        (asyncpg.ReadOnlySQLTransactionError, UNAVAILABLE),  # 25006
        (asyncpg.AdminShutdownError, UNAVAILABLE),  # 57P01
        (asyncpg.CrashShutdownError, UNAVAILABLE),  # 57P02
        (asyncpg.CannotConnectNowError, UNAVAILABLE),  # 57P03
        (asyncpg.TooManyConnectionsError, UNAVAILABLE),  # 53300
        (asyncpg.OutOfMemoryError, UNAVAILABLE),  # 53200
        (asyncpg.ConnectionDoesNotExistError, UNAVAILABLE),  # 08003
        (asyncpg.ConnectionFailureError, UNAVAILABLE),  # 08006
        (asyncpg.NotNullViolationError, None),  # 23502: the application's bug
        (asyncpg.CheckViolationError, None),  # 23514: likewise
        (asyncpg.InvalidCatalogNameError, None),  # 3D000: configuration
        (asyncpg.InvalidPasswordError, None),  # 28P01: configuration
        (asyncpg.PostgresSyntaxError, None),  # 42601: a bug
    ],
)
def test_sqlstate_decides_the_kind(
    error_class: type[Exception], kind: DatabaseErrorKind | None
) -> None:
    """A driver error is classified by its SQLSTATE alone."""
    assert classify_error(error_class("server message")) is kind


def test_plain_value_error_is_not_a_database_error() -> None:
    """An exception of the application's own is never classified."""
    assert classify_error(ValueError("bad input")) is None


def test_socket_error_not_raised_by_the_driver_is_not_classified() -> None:
    """An OSError the driver did not raise (another service refused) is not the database's."""
    with pytest.raises(ConnectionRefusedError) as raised:
        raise ConnectionRefusedError(111, "Connection refused")

    assert classify_error(raised.value) is None


async def test_timeout_not_raised_by_the_driver_is_not_classified() -> None:
    """A TimeoutError from the application's own deadline is not a database timeout."""
    with pytest.raises(TimeoutError) as raised:
        await asyncio.wait_for(asyncio.sleep(1), timeout=0.001)

    assert classify_error(raised.value) is None


def test_explicit_cause_is_followed() -> None:
    """`raise ... from database_error` keeps the database error's kind."""
    with pytest.raises(RuntimeError, match="wrapped") as raised:
        try:
            raise asyncpg.SerializationError("could not serialize access")
        except asyncpg.SerializationError as error:
            raise RuntimeError("wrapped") from error

    assert classify_error(raised.value) is RETRYABLE


def test_error_raised_while_handling_a_database_error_keeps_its_own_meaning() -> None:
    """An error raised in an `except` block, without `from`, is judged on its own: None here."""
    with pytest.raises(ValueError, match="the application's own decision") as raised:
        try:
            raise asyncpg.UniqueViolationError("duplicate key")
        except asyncpg.UniqueViolationError:
            raise ValueError("the application's own decision")  # noqa: B904 - the point

    assert classify_error(raised.value) is None


class _Wrapper(Exception):
    """An error wrapping a driver's as SQLAlchemy's do: the driver's error in `.orig`."""

    def __init__(self, orig: BaseException | None) -> None:
        super().__init__("wrapped")
        self.orig = orig


class _WithCodes(Exception):
    """An error carrying `sqlstate` and `pgcode` attributes of any value."""

    def __init__(self, sqlstate: object = None, pgcode: object = None) -> None:
        super().__init__("coded")
        self.sqlstate = sqlstate
        self.pgcode = pgcode


def test_the_wrapped_driver_error_is_read_before_the_cause() -> None:
    """`.orig` (the driver's error) is read before `__cause__`: breadth-first."""
    wrapper = _Wrapper(asyncpg.DeadlockDetectedError("deadlock detected"))
    wrapper.__cause__ = asyncpg.UniqueViolationError("duplicate key")

    assert sqlstate_of(wrapper) == "40P01"
    assert classify_error(wrapper) is RETRYABLE


def test_an_error_met_twice_in_the_chain_does_not_end_the_walk() -> None:
    """The same error as `.orig` and as `__cause__` (SQLAlchemy's usual wrapping) is read
    once, and the walk goes on to what lies behind it."""
    behind = asyncpg.SerializationError("could not serialize access")
    adapter = _Wrapper(None)
    adapter.__cause__ = behind
    wrapper = _Wrapper(adapter)
    wrapper.__cause__ = adapter

    assert sqlstate_of(wrapper) == "40001"
    assert classify_error(wrapper) is RETRYABLE


@pytest.mark.parametrize("value", ["", "4000", "40P01X", 40001], ids=repr)
def test_a_sqlstate_attribute_that_is_not_five_characters_is_not_a_sqlstate(
    value: object,
) -> None:
    """Only a five-character string is taken for a SQLSTATE; `pgcode` (psycopg2's) is next."""
    assert sqlstate_of(_WithCodes(sqlstate=value)) is None
    assert sqlstate_of(_WithCodes(sqlstate=value, pgcode="40P01")) == "40P01"
