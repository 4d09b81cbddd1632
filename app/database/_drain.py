"""Shutting an engine down: in-flight work gets a grace period, then its connections are cut.

`AsyncEngine.dispose()` alone closes only the connections resting in the pool:
one still checked out would go back to a pool nobody owns and stay open, and a
session that checks out after `dispose()` would get a connection from the fresh
pool SQLAlchemy creates in its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util import greenlet_spawn

from ._closing import cancels_sent
from ._errors import DatabaseNotInitializedError

# Set in a checked-out connection's `info` by code that closes it itself
# (the test isolation harness): close() neither waits for it nor cuts it.
NOT_DRAINED = "app.database.not_drained"


class Drain:
    """Knows which of an engine's connections are in use, and can shut the engine down."""

    def __init__(
        self, engine: AsyncEngine, refusal: Callable[[], DatabaseNotInitializedError]
    ) -> None:
        self._engine = engine
        self._in_use: set[ConnectionPoolEntry] = set()
        self._closing = False
        self._returned = asyncio.Event()  # set whenever a connection comes back
        self._refusal = refusal
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "checkout", self._checked_out)
        event.listen(sync_engine, "checkin", self._released)
        event.listen(sync_engine, "invalidate", self._released)
        # insert=True: ahead of the caller's own listeners, which may connect themselves.
        event.listen(sync_engine, "do_connect", self._refuse_when_closing, insert=True)

    def _checked_out(self, _: Any, record: ConnectionPoolEntry, __: Any) -> None:
        self._in_use.add(record)

    def _released(self, _: Any, record: ConnectionPoolEntry, *__: Any) -> None:
        self._in_use.discard(record)
        self._returned.set()

    def _refuse_when_closing(self, *_: Any) -> None:
        if self._closing:
            raise self._refusal()

    def _live(self) -> list[ConnectionPoolEntry]:
        # An entry invalidated while out holds no connection and may never check in.
        return [
            record
            for record in self._in_use
            if record.dbapi_connection is not None and not record.info.get(NOT_DRAINED)
        ]

    async def cut_in_use(self) -> int:
        """Cut the connections in use now (their server stalled); returns how many."""
        remaining = self._live()
        for record in remaining:
            await greenlet_spawn(record.invalidate)
        return len(remaining)

    async def close(self, grace: float) -> int:
        """Wait up to `grace` seconds for connections in use, cut the rest, dispose.

        Returns how many connections were cut. Their units of work fail with a
        connection error and roll back (the server discards an unfinished
        transaction when its connection drops).
        """
        self._closing = True
        try:
            await self._wait_for_release(grace)
        finally:
            # Also when the wait is cancelled: a half-closed engine would keep its pool.
            # In a greenlet, as the pool itself would: closing may await the driver.
            cut = await self.cut_in_use()
            await self._engine.dispose()
        # The cut connections' backends may still be running their statements: make
        # sure the server was asked to stop them before the process can exit.
        await cancels_sent()
        return cut

    async def _wait_for_release(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._live() and (left := deadline - time.monotonic()) > 0:
            self._returned.clear()
            # asyncio.TimeoutError: TimeoutError itself only from Python 3.11.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._returned.wait(), left)
