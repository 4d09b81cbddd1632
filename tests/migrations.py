"""Alembic, driven by the tests: on what they hand env.py, or as the `alembic` command."""

from __future__ import annotations

import os
from typing import TypeAlias

from alembic import command
from alembic.config import Config
from sqlalchemy import inspect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.paths import REPO_ROOT
from tests.subprocesses import Result, run_python


def alembic_config() -> Config:
    """The repository's own Alembic configuration."""
    return Config(REPO_ROOT / "alembic.ini")


Connectable: TypeAlias = Connection | Engine | AsyncConnection | AsyncEngine
"""What env.py accepts in `config.attributes["connection"]` instead of DATABASE_URL."""


def _on(connection: Connectable) -> Config:
    config = alembic_config()
    # env.py migrates this instead of opening its own engine.
    config.attributes["connection"] = connection
    return config


def upgrade(connection: Connectable, revision: str = "head") -> None:
    """Upgrade the database behind `connection` to `revision`; for `run_sync` too."""
    command.upgrade(_on(connection), revision)


def downgrade(connection: Connection, revision: str = "base") -> None:
    """Downgrade the database behind `connection` to `revision`; for `run_sync`."""
    command.downgrade(_on(connection), revision)


def table_names(connection: Connection) -> list[str]:
    """The tables in the connection's default schema; for `run_sync`."""
    return inspect(connection).get_table_names()


async def run_alembic(*args: str, database_url: URL | str) -> Result:
    """The `alembic` command itself, as an operator runs it, on `database_url`."""
    if isinstance(database_url, URL):
        database_url = database_url.render_as_string(hide_password=False)
    env = {**os.environ, "DATABASE_URL": database_url}
    return await run_python("-m", "alembic", *args, cwd=REPO_ROOT, env=env)
