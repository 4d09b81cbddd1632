"""Counting a manager's PostgreSQL round trips through the request-path benchmark's proxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy.engine import URL

from app.database import DatabaseSessionManager, _liveness
from benchmarks.request_path.proxy import RoundTripProxy


@asynccontextmanager
async def counted_manager(
    database_url: URL, monkeypatch: pytest.MonkeyPatch, **init_options: Any
) -> AsyncIterator[tuple[DatabaseSessionManager, RoundTripProxy]]:
    """A manager whose connections go through a counting proxy; closed, with it, at exit.

    One connection by default, so that every unit of work reuses the same backend.
    """
    # Sequential units within a second skip the liveness ping; keep a slow machine's
    # gap from adding one to a count.
    monkeypatch.setattr(_liveness, "FRESH_SECONDS", 3600.0)
    proxy = RoundTripProxy(database_url.host or "127.0.0.1", database_url.port or 5432)
    port = await proxy.start()
    manager = DatabaseSessionManager()
    options = {"pool_size": 1, "max_overflow": 0, **init_options}
    try:
        manager.init(database_url.set(host="127.0.0.1", port=port), **options)
        try:
            yield manager, proxy
        finally:
            await manager.close()
    finally:
        await proxy.close()
