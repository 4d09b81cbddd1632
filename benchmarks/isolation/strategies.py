"""The isolation strategies, each a full per-test cost: set-up, the test body, clean-up.

Each strategy works in a database of its own, so that one's residue (the rows
`bare` accumulates, the catalog churn of `drop_create`) cannot slow another.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from itertools import count

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from app.database import DatabaseSessionManager
from app.database.testing import isolated

from .schema import TRUNCATE_ALL, metadata, row_count, simulated_test


class Strategy(ABC):
    """One way to isolate tests; `run_test()` is what the benchmark times."""

    name: str
    # Whether the tables must be empty after the run: true of those that clean up after
    # each test; `bare` keeps every row, `drop_create` the last test's.
    cleans_up_after = True

    def __init__(self, url: URL) -> None:
        self.url = url
        self.manager = DatabaseSessionManager()
        self._keys = count()

    def next_key(self) -> str:
        # Unique per run, so that `bare`, which never cleans up, never collides.
        return f"{self.name}-{next(self._keys)}"

    async def start(self) -> None:
        """Open the manager on the strategy's database, whose schema already exists."""
        self.manager.init(self.url)

    @abstractmethod
    async def run_test(self) -> None:
        """One whole test as the strategy runs it."""

    async def finish(self) -> None:
        """Check that the strategy left no row behind (if it cleans up after), then close."""
        if self.cleans_up_after:
            async with self.manager.engine.connect() as connection:
                left = await row_count(connection)
            if left:
                raise RuntimeError(f"strategy {self.name!r} left {left} rows behind")
        await self.close()

    async def close(self) -> None:
        await self.manager.close()


class Bare(Strategy):
    """No isolation and no clean-up: the body alone, the baseline for the overhead."""

    name = "bare"
    cleans_up_after = False

    async def run_test(self) -> None:
        await simulated_test(self.manager, self.next_key())


class Rollback(Strategy):
    """The package's `isolated()`: the body's commit releases a savepoint, all rolled back."""

    name = "rollback"

    async def run_test(self) -> None:
        async with isolated(self.manager):
            await simulated_test(self.manager, self.next_key())


class Truncate(Strategy):
    """The body commits for real; every table is truncated after it."""

    name = "truncate"

    async def run_test(self) -> None:
        await simulated_test(self.manager, self.next_key())
        async with self.manager.engine.begin() as connection:
            await connection.execute(text(TRUNCATE_ALL))


class DropCreate(Strategy):
    """Every table dropped and created again (one transaction) before the body."""

    name = "drop_create"
    cleans_up_after = False

    async def run_test(self) -> None:
        async with self.manager.engine.begin() as connection:
            await connection.run_sync(metadata.drop_all)
            await connection.run_sync(metadata.create_all)
        await simulated_test(self.manager, self.next_key())


class Template(Strategy):
    """A fresh copy of a migrated template database per test, dropped after it.

    `url` names the template; each test's copy is `<template>_copy`. The admin
    connection stays open for the run, so the test pays for CREATE and DROP
    DATABASE, not for connecting to the maintenance database twice.
    """

    name = "template"

    def __init__(self, url: URL) -> None:
        super().__init__(url)
        self.copy_url = url.set(database=f"{url.database}_copy")
        self._admin: AsyncEngine | None = None
        self._connection: AsyncConnection | None = None

    async def start(self) -> None:
        self._admin = create_async_engine(
            self.url.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        self._connection = await self._admin.connect()

    async def _admin_execute(self, statement: str) -> None:
        if self._connection is None:
            raise RuntimeError("Template.start() must run before the first test")
        await self._connection.execute(text(statement))

    async def run_test(self) -> None:
        copy = self.copy_url.database
        await self._admin_execute(f'CREATE DATABASE "{copy}" TEMPLATE "{self.url.database}"')
        manager = DatabaseSessionManager()
        manager.init(self.copy_url)
        try:
            await simulated_test(manager, self.next_key())
        finally:
            await manager.close()
            await self._admin_execute(f'DROP DATABASE "{copy}" WITH (FORCE)')

    async def finish(self) -> None:
        # Every copy was dropped; the template itself was never written to.
        await self.close()

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        if self._admin is not None:
            await self._admin.dispose()
            self._admin = None


STRATEGIES: tuple[type[Strategy], ...] = (Rollback, Truncate, DropCreate, Template, Bare)
"""In the report's row order: the package's own strategy first, the baseline last."""
