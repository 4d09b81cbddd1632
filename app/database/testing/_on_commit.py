"""Seeing, and running, the on-commit callbacks of code under rollback isolation."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection

from .._on_commit import OnCommitCallback, capturing


@asynccontextmanager
async def capture_on_commit_callbacks(
    connection: AsyncConnection, *, execute: bool = False
) -> AsyncIterator[list[OnCommitCallback]]:
    """Yield the list of `on_commit` callbacks whose session committed in the block.

    Under isolation a session's commit only releases a savepoint of `connection`'s
    transaction, which is rolled back at the end, so their callbacks never run on
    their own. They are appended to the list instead, in commit order; callbacks
    of sessions that rolled back are not. With `execute=True` they are called (and
    awaited) when the block exits without an error, in order, including callbacks
    that those register; an exception from one propagates, so the test fails.
    """
    target = connection.sync_connection
    if target is None:
        raise RuntimeError("capture_on_commit_callbacks() needs an open connection")
    with capturing(target) as captured:
        yield captured
        if execute:
            # By index: a callback that commits a session of its own appends to the list.
            done = 0
            while done < len(captured):
                result = captured[done]()
                done += 1
                if inspect.isawaitable(result):
                    await result
