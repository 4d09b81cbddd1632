"""transaction_pooler=True: the driver settings it adds or refuses, and the statements refused."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import make_url

from app.database import (
    DatabaseConfigError,
    DatabaseErrorKind,
    DatabaseSessionManager,
    TransactionPoolerError,
)
from app.database._config import engine_options
from app.database._pooler import _refuse_session_state
from app.database._session_statements import session_effects
from app.database.drivers import driver_for

ASYNCPG = make_url("postgresql+asyncpg://app@pooler.example/app")
PSYCOPG = make_url("postgresql+psycopg://app@pooler.example/app")
UNAVAILABLE = DatabaseErrorKind.UNAVAILABLE
# How libpq reports a login the server refused.
LOGIN = 'connection to server at "db", port 5432 failed: FATAL:  '


def test_asyncpg_prepares_nothing_that_outlives_a_transaction() -> None:
    """Both statement caches are off, and statements are unnamed: each Parse replaces the last."""
    connect_args = engine_options({}, ASYNCPG, transaction_pooler=True)["connect_args"]

    assert connect_args["statement_cache_size"] == 0
    assert connect_args["prepared_statement_cache_size"] == 0
    assert connect_args["prepared_statement_name_func"]() == ""


def test_psycopg_never_prepares_on_the_server() -> None:
    """psycopg's prepare-after-5-executions is switched off."""
    connect_args = engine_options({}, PSYCOPG, transaction_pooler=True)["connect_args"]

    assert "prepare_threshold" in connect_args
    assert connect_args["prepare_threshold"] is None


@pytest.mark.parametrize("url", [ASYNCPG, PSYCOPG], ids=["asyncpg", "psycopg"])
def test_without_the_pooler_mode_statements_are_prepared_as_usual(url: object) -> None:
    """The pooler settings are added only when asked for: a direct connection keeps its caches."""
    connect_args = engine_options({}, make_url(str(url)))["connect_args"]

    assert not {"statement_cache_size", "prepare_threshold"} & set(connect_args)


@pytest.mark.parametrize(
    ("url", "connect_args", "message"),
    [
        (ASYNCPG, {"statement_cache_size": 100}, "statement_cache_size=100 contradicts"),
        (
            make_url(f"{ASYNCPG}?prepared_statement_cache_size=500"),
            {},
            "prepared_statement_cache_size='500' contradicts",
        ),
        (PSYCOPG, {"prepare_threshold": 5}, "prepare_threshold=5 contradicts"),
    ],
    ids=["asyncpg-cache", "asyncpg-url-cache", "psycopg-threshold"],
)
def test_settings_that_contradict_the_pooler_mode_are_refused(
    url: object, connect_args: dict[str, object], message: str
) -> None:
    """A cache the caller asked for would break behind the pooler: init() says so and why."""
    with pytest.raises(DatabaseConfigError, match=re.escape(message)):
        engine_options({"connect_args": connect_args}, make_url(str(url)), transaction_pooler=True)


def test_pooler_mode_needs_a_postgresql_driver_the_package_knows() -> None:
    """SQLite has no pooler to be safe behind: the option is refused, naming the drivers."""
    with pytest.raises(DatabaseConfigError, match="asyncpg or psycopg"):
        engine_options({}, make_url("sqlite+aiosqlite://"), transaction_pooler=True)


def test_pooler_flag_must_be_a_boolean() -> None:
    """A string such as "false" would read as true: refused."""
    with pytest.raises(DatabaseConfigError, match="transaction_pooler must be True or False"):
        DatabaseSessionManager().init(str(ASYNCPG), transaction_pooler="false")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("statement", "alternative"),
    [
        ("SET search_path TO tenant_a", "SET LOCAL"),
        ("SET ROLE app_tenant", "SET LOCAL"),
        ("SELECT set_config('app.tenant', '1', false)", "set_config(name, value, true)"),
        ("SELECT pg_advisory_lock(42)", "pg_advisory_xact_lock()"),
        ("SELECT pg_try_advisory_lock_shared(42)", "pg_advisory_xact_lock()"),
        ("LISTEN jobs", "connection of its own"),
        ("PREPARE p AS SELECT 1", "bound parameters"),
        ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "without WITH HOLD"),
        ("CREATE TEMP TABLE t (x int)", "ON COMMIT DROP"),
        ("LOAD 'auto_explain'", "session_preload_libraries"),
        ("SELECT 1; SET x.y = 1", "SET LOCAL"),
        ("SELECT 1 AS x INTO TEMP t", "ON COMMIT DROP"),
        ("CREATE TABLE pg_temp.t (x int)", "ON COMMIT DROP"),
    ],
)
def test_session_level_statements_are_refused_naming_the_alternative(
    statement: str, alternative: str
) -> None:
    """Each statement that would leak to another client is refused with its transaction form."""
    with pytest.raises(TransactionPoolerError, match=re.escape(alternative)):
        _refuse_session_state(None, None, statement)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "statement",
    [
        "SET LOCAL search_path TO tenant_a",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
        "SELECT set_config('app.tenant', '1', true)",
        "SELECT pg_advisory_xact_lock(42)",
        "DECLARE c CURSOR FOR SELECT 1",
        "DECLARE c NO SCROLL CURSOR WITHOUT HOLD FOR SELECT 1",
        "CREATE TEMP TABLE t (x int) ON COMMIT DROP",
        "NOTIFY jobs",
        "SELECT 'SET x = 1'",
        "CREATE TABLE pg_temp.t (x int) ON COMMIT DROP",
    ],
)
def test_transaction_scoped_statements_pass(statement: str) -> None:
    """What ends with the transaction is safe behind a pooler and is sent as usual."""
    _refuse_session_state(None, None, statement)  # type: ignore[arg-type]
    assert all(not effect.outlives_transaction for effect in session_effects(statement))


@pytest.mark.parametrize(
    "statement",
    [
        "DO $$BEGIN PERFORM pg_notify('jobs', 'x'); END$$",
        "RESET search_path",
        "DISCARD TEMP",
        "UNLISTEN *",
    ],
)
def test_statements_that_leave_no_state_for_another_client_pass(statement: str) -> None:
    """A DO block may change nothing; RESET, DISCARD and UNLISTEN leave a new session's state.

    Both still cost a reset without a pooler (tests/integration/test_session_state.py).
    """
    _refuse_session_state(None, None, statement)  # type: ignore[arg-type]
    assert session_effects(statement), "not seen at all: the reset would miss it"


@pytest.mark.parametrize("creator", ["async_creator", "creator"])
@pytest.mark.parametrize("url", [ASYNCPG, PSYCOPG], ids=["asyncpg", "psycopg"])
def test_a_creator_that_would_bypass_the_drivers_settings_is_refused(
    url: object, creator: str
) -> None:
    """SQLAlchemy ignores connect_args with a creator: refused, naming do_connect instead."""
    with pytest.raises(DatabaseConfigError, match="do_connect"):
        engine_options({creator: lambda: None}, make_url(str(url)), transaction_pooler=True)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            'connection failed: connection to server at "db", port 5432 failed: Connection refused',
            UNAVAILABLE,
        ),
        ("failed to resolve host 'db': [Errno -2] Name or service not known", UNAVAILABLE),
        ("consuming input failed: server closed the connection unexpectedly", UNAVAILABLE),
        (
            f"{LOGIN}sorry, too many clients already",
            UNAVAILABLE,
        ),
        (
            f"{LOGIN}the database system is starting up",
            UNAVAILABLE,
        ),
        (
            f"{LOGIN}password authentication failed",
            None,
        ),
        (
            f"{LOGIN}no pg_hba.conf entry for host",
            None,
        ),
        (
            f'{LOGIN}unrecognized configuration parameter "x"',
            None,
        ),
    ],
)
def test_psycopg_failures_without_sqlstate_are_told_apart(message: str, kind: object) -> None:
    """Network failures and a full or starting server are outages; refused logins are not."""
    import psycopg

    driver = driver_for("psycopg")
    assert driver is not None
    assert driver.classify(psycopg.OperationalError(message)) is kind
