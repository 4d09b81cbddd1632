"""The manager's lifecycle (new, open, closed): every illegal move has a clear error."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.pool import QueuePool

import app.database._fastapi
from app.database import (
    DatabaseAlreadyInitializedError,
    DatabaseNotInitializedError,
    DatabaseSessionManager,
    _liveness,
    get_db,
)

# Nothing connects until the first session, so these tests need no server.
URL = "postgresql+asyncpg://app@127.0.0.1:1/never_connected"
INIT_HINT = "call `session_manager.init(url=...)` at start-up"


async def test_session_before_init_names_the_fix(manager: DatabaseSessionManager) -> None:
    """session() before init() raises a RuntimeError that says to call init()."""
    with pytest.raises(DatabaseNotInitializedError, match=re.escape(INIT_HINT)):
        async with manager.session():
            pass
    assert issubclass(DatabaseNotInitializedError, RuntimeError)


def test_engine_before_init_names_the_fix(manager: DatabaseSessionManager) -> None:
    """The engine property before init() raises the same clear error."""
    with pytest.raises(DatabaseNotInitializedError, match=re.escape(INIT_HINT)):
        _ = manager.engine


async def test_get_db_before_init_names_the_fix(
    manager: DatabaseSessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The FastAPI dependency, used before the lifespan ran init(), names the fix."""
    # The integration fixtures keep the app's singleton open: stand in a fresh one.
    monkeypatch.setattr(app.database._fastapi, "session_manager", manager)
    dependency = get_db()
    with pytest.raises(DatabaseNotInitializedError, match=re.escape(INIT_HINT)):
        await anext(dependency)


async def test_init_sets_the_documented_defaults(manager: DatabaseSessionManager) -> None:
    """asyncpg: cheap liveness check, not pre-ping; hourly recycling; state kept on commit."""
    manager.init(url=URL)
    try:
        engine = manager.engine
        assert isinstance(engine, AsyncEngine)
        assert engine.pool._pre_ping is False
        assert event.contains(engine.sync_engine, "checkout", _liveness._ensure_alive)
        assert engine.pool._recycle == 3600
        async with manager.session() as session:
            assert isinstance(session, AsyncSession)
            assert session.sync_session.expire_on_commit is False
    finally:
        await manager.close()


@pytest.mark.parametrize(
    ("url", "options"),
    [("sqlite+aiosqlite:///:memory:", {}), (URL, {"pool_pre_ping": True})],
    ids=["other-driver", "asked-for"],
)
async def test_pre_ping_is_kept_for_other_drivers_and_when_asked_for(
    manager: DatabaseSessionManager, url: str, options: dict[str, Any]
) -> None:
    """pool_pre_ping stays on where the cheap check does not apply or the caller set it."""
    manager.init(url=url, **options)
    try:
        assert manager.engine.pool._pre_ping is True
        assert not event.contains(manager.engine.sync_engine, "checkout", _liveness._ensure_alive)
    finally:
        await manager.close()


async def test_engine_options_override_the_defaults(manager: DatabaseSessionManager) -> None:
    """Keyword arguments to init() reach create_async_engine and win over defaults."""
    manager.init(url=URL, pool_pre_ping=False, pool_recycle=60, pool_timeout=7)
    try:
        pool = manager.engine.pool
        assert isinstance(pool, QueuePool)
        assert (pool._pre_ping, pool._recycle, pool.timeout()) == (False, 60, 7)
    finally:
        await manager.close()


@pytest.mark.parametrize(
    ("sizes", "shape"),
    [
        ({}, (15, 0)),
        ({"pool_size": 3, "max_overflow": 2}, (3, 2)),
        ({"pool_size": 4}, (4, 0)),
        ({"max_overflow": 5}, (15, 5)),
    ],
)
async def test_pool_is_shaped_as_given(
    manager: DatabaseSessionManager, sizes: dict[str, Any], shape: tuple[int, int]
) -> None:
    """The sizes passed are used as given; only what is left out takes the default (15 + 0)."""
    manager.init(url=URL, **sizes)
    try:
        pool = manager.engine.pool
        assert isinstance(pool, QueuePool)
        assert (pool.size(), pool._max_overflow) == shape  # no public accessor for the latter
        assert pool._pool.use_lifo is True  # no public accessor
    finally:
        await manager.close()


async def test_init_twice_says_to_close_first(manager: DatabaseSessionManager) -> None:
    """A second init() on an open manager is refused and keeps the first engine."""
    manager.init(url=URL)
    first = manager.engine
    try:
        with pytest.raises(DatabaseAlreadyInitializedError, match=re.escape("close()")):
            manager.init(url=URL)
        assert manager.engine is first
    finally:
        await manager.close()


async def test_close_is_idempotent_and_allowed_before_init(
    manager: DatabaseSessionManager,
) -> None:
    """close() before init() and twice after it does nothing and raises nothing."""
    await manager.close()
    manager.init(url=URL)
    await manager.close()
    await manager.close()


async def test_session_after_close_says_closed(manager: DatabaseSessionManager) -> None:
    """After close(), session() fails and says how to reopen."""
    manager.init(url=URL)
    await manager.close()

    with pytest.raises(DatabaseNotInitializedError, match="is closed"):
        async with manager.session():
            pass
    with pytest.raises(DatabaseNotInitializedError, match="is closed"):
        _ = manager.engine


async def test_init_after_close_opens_a_new_engine(manager: DatabaseSessionManager) -> None:
    """init() works again after close(), with a new engine."""
    manager.init(url=URL)
    first = manager.engine
    await manager.close()

    manager.init(url=URL)
    try:
        assert manager.engine is not first
    finally:
        await manager.close()


async def test_repr_shows_state_without_password(manager: DatabaseSessionManager) -> None:
    """The repr tells the state, and the URL with its password masked."""
    assert repr(manager) == "<DatabaseSessionManager new>"
    manager.init(url="postgresql+asyncpg://app:hunter2@db:5432/app")
    try:
        assert repr(manager) == (
            "<DatabaseSessionManager open url='postgresql+asyncpg://app:***@db:5432/app'>"
        )
    finally:
        await manager.close()
    assert repr(manager) == "<DatabaseSessionManager closed>"
