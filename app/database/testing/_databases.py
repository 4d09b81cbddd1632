"""Creating and dropping a PostgreSQL database for a test run."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

DUPLICATE_DATABASE = "42P04"


class DatabaseSetupError(RuntimeError):
    """The test database could not be created; the message says what to change."""


async def _on_maintenance_database(url: URL, statement: str) -> None:
    # CREATE/DROP DATABASE cannot run inside a transaction: AUTOCOMMIT, and a
    # one-off connection to the server's maintenance database.
    admin = create_async_engine(
        url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        async with admin.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await admin.dispose()


async def create_test_database(url: URL) -> None:
    """Create the database `url` names; refuse one that exists already."""
    shown = url.render_as_string(hide_password=True)
    try:
        await _on_maintenance_database(url, f'CREATE DATABASE "{url.database}"')
    except DBAPIError as error:
        if getattr(error.orig, "sqlstate", None) == DUPLICATE_DATABASE:
            raise DatabaseSetupError(
                f"database {url.database!r} already exists and may belong to another "
                "run, so it is neither reused nor dropped: if no other run uses it, "
                "drop it (a killed run leaves its database behind)"
            ) from None
        raise DatabaseSetupError(
            f"cannot create the test database at {shown}: {error.orig}"
        ) from None
    except OSError as error:
        raise DatabaseSetupError(
            f"no PostgreSQL server answers at {shown} ({type(error).__name__})"
        ) from None


async def drop_test_database(url: URL) -> None:
    """Drop the database `url` names, closing any connection still open to it."""
    statement = f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)'
    await _on_maintenance_database(url, statement)
