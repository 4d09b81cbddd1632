"""Migrating the test database with the service's own Alembic configuration.

`alembic upgrade head`, pinned to the URL it is given, in a worker thread with a
time limit; a failure stops the run with a message that names the fix and shows
no password. `pytest_plugin.py` decides when to call it (its `database_migrate`
fixture) and how long it may take (`database_migrate_timeout`).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import threading
import traceback
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection, make_url

from .._classify import DatabaseErrorKind, classify_error, failed_to_connect

# Every table, in every schema but the server's own (a partitioned table's
# partitions through it): an upgrade that adds none migrated another database.
# The plugin counts their rows too, to find what a test left committed.
_TABLES = text(
    "SELECT n.nspname = current_schema(), n.nspname, c.relname "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition "
    "AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%' "
    "ORDER BY 2, 3"
)


def list_tables(connection: Connection) -> list[tuple[str | None, str]]:
    """(schema, name) of each table; schema None for the current schema's."""
    rows = connection.execute(_TABLES)
    return [(None if current else schema, name) for current, schema, name in rows]


def alembic_config_files(rootpath: Path) -> tuple[Path | None, Path | None] | None:
    """The service's Alembic settings: alembic.ini, pyproject.toml's [tool.alembic], or none."""
    ini = rootpath / "alembic.ini"
    pyproject = rootpath / "pyproject.toml"
    # A text search: tomllib is not in Python 3.10, and Alembic parses the file itself.
    toml = pyproject if pyproject.is_file() and "[tool.alembic]" in pyproject.read_text() else None
    if not ini.is_file() and toml is None:
        return None
    return (ini if ini.is_file() else None, toml)


class _UrlOverriddenError(RuntimeError):
    """env.py tried to point the Alembic config at another database than the test's."""


def _without_password(message: str, url: URL) -> str:
    shown = message.replace(url.render_as_string(hide_password=False), str(url))
    if url.password:
        password = str(url.password)
        for form in {password, quote(password, safe=""), quote_plus(password)}:
            shown = shown.replace(form, "***")
    return shown


def _masked(url_text: str) -> str:
    """Another URL (the service's own), its password hidden, even if it does not parse."""
    try:
        return make_url(url_text).render_as_string(hide_password=True)
    except Exception:  # anything it raises: the text may still carry a password
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url_text)


def _test_database_config(files: tuple[Path | None, Path | None], url: URL) -> Any:
    """An Alembic Config whose sqlalchemy.url is the test database's, and stays so."""
    alembic_config = importlib.import_module("alembic.config")  # only suites that use it
    secret_url = url.render_as_string(hide_password=False)

    class TestDatabaseConfig(alembic_config.Config):  # type: ignore[misc,name-defined]
        # An env.py that sets sqlalchemy.url from the service's settings (a common
        # style) is stopped here, before it connects to, and migrates, that database.
        def set_section_option(self, section: str, name: str, value: str) -> None:
            pinned = getattr(self, "_pinned_section", None)
            if section == pinned and name == "sqlalchemy.url":
                wanted = value.replace("%%", "%")
                if wanted != secret_url:
                    shown = _masked(wanted)
                    raise _UrlOverriddenError(
                        f"env.py set sqlalchemy.url to {shown!r}, which would migrate "
                        "that database instead of the test database"
                    )
            super().set_section_option(section, name, value)

    ini, toml = files
    config = TestDatabaseConfig(
        str(ini) if ini else None, **({"toml_file": str(toml)} if toml else {})
    )
    # Where env.py reads its URL (Alembic's templates do); the ini file is parsed
    # with interpolation, where "%" is written "%%".
    config.set_main_option("sqlalchemy.url", secret_url.replace("%", "%%"))
    config._pinned_section = config.config_ini_section
    return config


def alembic_upgrade_head(
    connection: Connection,
    files: tuple[Path | None, Path | None],
    url: URL,
    timeout: float,
) -> None:
    """`alembic upgrade head` on `url`; fails if it hangs, raises or migrates another database."""
    alembic_command = importlib.import_module("alembic.command")
    config = _test_database_config(files, url)
    # On a connection of its own: the set-up transaction must not be open while the
    # migration runs (CREATE INDEX CONCURRENTLY, for one, would wait for it).
    with connection.engine.connect() as probe:
        tables_before = list_tables(probe)
    failures: list[BaseException] = []

    def upgrade() -> None:
        # A loop set but not running, for an env.py that calls
        # asyncio.get_event_loop() (which a new thread would refuse).
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            alembic_command.upgrade(config, "head")
        except BaseException as error:  # reported on the test's thread below
            failures.append(error)
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    # Alembic's env.py templates call logging.config.fileConfig(), which disables
    # every logger that exists and is not in alembic.ini: the package's and the
    # service's own, for the rest of the run (caplog would then see nothing).
    enabled = [
        logger
        for logger in logging.root.manager.loggerDict.values()
        if isinstance(logger, logging.Logger) and not logger.disabled
    ]
    # A thread of its own, where no event loop runs: the service's env.py can then
    # start one (asyncio.run, as Alembic's async template does), or find none and
    # not wait on this one (which, blocked here, would never serve it).
    worker = threading.Thread(target=upgrade, name="alembic upgrade head", daemon=True)
    worker.start()
    worker.join(timeout)
    for logger in enabled:
        logger.disabled = False
    shown_url = str(url)
    fix = (
        "the plugin runs `alembic upgrade head` in a worker thread, with no event "
        "loop running, and sets sqlalchemy.url to the test database: env.py must take "
        'its URL from config.get_main_option("sqlalchemy.url") when it is set (or '
        "override the database_migrate fixture)"
    )
    if worker.is_alive():
        pytest.fail(
            f"alembic upgrade head on {shown_url} did not finish in {timeout:g} s: {fix}; "
            "for migrations that take longer, raise database_migrate_timeout",
            pytrace=False,
        )
    if failures:
        error = failures[0]
        # The plugin has just connected to the test database: env.py failing to
        # connect (no such database, other credentials) connected somewhere else.
        elsewhere = (
            isinstance(error, (_UrlOverriddenError, OSError))
            or classify_error(error) is DatabaseErrorKind.UNAVAILABLE
            or failed_to_connect(error)
        )
        advice = fix if elsewhere else "the traceback shows the migration or env.py line"
        detail = _without_password("".join(traceback.format_exception(error)), url)
        pytest.fail(f"alembic upgrade head failed: {advice}.\n{detail}", pytrace=False)
    if list_tables(connection) == tables_before:
        pytest.fail(
            f"alembic upgrade head created no table in {shown_url} (not even "
            f"alembic_version), so env.py migrated another database: {fix}",
            pytrace=False,
        )
