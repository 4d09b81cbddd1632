"""Rollback isolation: a test's work runs in one outer transaction that is never committed."""

from __future__ import annotations

import importlib
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from .._drain import NOT_DRAINED
from .._manager import DatabaseSessionManager, joined_sessionmaker
from .._read_only import read_only_savepoint

if TYPE_CHECKING:
    from fastapi import FastAPI


# What to undo when an isolation ends (the app overrides that share_session_with_app()
# installed), by the isolation's connection: a connection is a key while its
# isolation lasts.
_UNDO_AT_END: weakref.WeakKeyDictionary[Connection, list[Callable[[], None]]] = (
    weakref.WeakKeyDictionary()
)


# What an override map held for a dependency it had no override for.
_ABSENT = object()


class IsolationError(RuntimeError):
    """The test tried to commit the outer transaction that keeps it isolated."""


def _refuse_outer_commit(connection: Connection) -> None:
    # SQLAlchemy treats a transaction whose commit raised as finished and skips the
    # pool's reset: roll back here, or the test's work would ride along to the next
    # checkout and could be committed there.
    connection.engine.dialect.do_rollback(connection.connection)
    raise IsolationError(
        "the test's outer transaction must not be committed, or its work would persist: "
        "commit a session instead (its commit() only releases a savepoint)"
    )


@asynccontextmanager
async def isolated(manager: DatabaseSessionManager) -> AsyncIterator[AsyncConnection]:
    """Open an outer transaction, join every session of `manager` to it, roll it back at exit.

    Yields the connection, for extra sessions (`joined_session`) or `count_queries`.
    If the block ends normally, constraints deferred to COMMIT are checked before
    the rollback, so a violation fails the test instead of vanishing with it.
    """
    engine = manager.engine
    async with engine.connect() as connection:
        outer = await connection.begin()
        sync_connection = connection.sync_connection
        if sync_connection is None:  # pragma: no cover - connect() always sets it
            raise RuntimeError("connect() returned a closed connection")
        event.listen(sync_connection, "commit", _refuse_outer_commit)
        # The harness's own connection: close() inside the block must not cut it.
        sync_connection.info[NOT_DRAINED] = True
        _UNDO_AT_END[sync_connection] = []
        try:
            try:
                with manager._sessions_joining(connection):
                    yield connection
            finally:
                for undo in reversed(_UNDO_AT_END.pop(sync_connection, [])):
                    undo()
            # (Not after a refused outer commit: the transaction is already gone.)
            if outer.is_active and connection.dialect.name == "postgresql":
                # Checks every constraint still deferred now, as COMMIT would have.
                await connection.execute(text("SET CONSTRAINTS ALL IMMEDIATE"))
        finally:
            event.remove(sync_connection, "commit", _refuse_outer_commit)
            sync_connection.info.pop(NOT_DRAINED, None)
            # The connection's rollback(), not outer's: it also clears the state a
            # refused commit leaves behind.
            await connection.rollback()
            if manager._engine is not engine:
                # close() ran during the block and disposed of the pool this connection
                # would return to, which would leave it open: close it now.
                await connection.invalidate()


def joined_session(connection: AsyncConnection) -> AsyncSession:
    """A new session inside the test's transaction, configured like the manager's."""
    return joined_sessionmaker(connection)()


def share_session_with_app(app: FastAPI, session: AsyncSession) -> Callable[[], None]:
    """Make every request of the FastAPI `app` use `session` itself, until the test ends.

    Routes then share the test's identity map; `ReadSessionDep` routes get it inside a
    read-only savepoint. Like `get_db`, the override commits
    (releases the savepoint) when the route returns and rolls back when it raises;
    a failed request therefore also rolls back the test's own uncommitted work.

    The app's previous overrides of `get_db` and `get_read_db` come back when the
    isolation `session` belongs to ends (with the pytest plugin, at the end of the
    test), so a module-level `app` is left as it was; the returned function puts
    them back earlier, and is the only way back for a session outside an
    isolation. Requests then bypass the package's own `get_db`: see the README
    for what such a test does not exercise.
    """
    # First: a session without a bind raises here, before the app is changed.
    bind = session.sync_session.get_bind()
    # Looked up here, so that this module imports without FastAPI.
    fastapi_module = importlib.import_module(".._fastapi", __package__)
    get_db, get_read_db = fastapi_module.get_db, fastapi_module.get_read_db

    async def test_session() -> AsyncIterator[AsyncSession]:
        try:
            yield session
            await session.commit()
        except BaseException:
            # Also after a failed commit: leave the session usable for the test.
            await session.rollback()
            raise

    async def test_read_session() -> AsyncIterator[AsyncSession]:
        # In a read-only savepoint: a write through ReadSessionDep fails as in production.
        savepoint = await session.begin_nested()
        try:
            async with read_only_savepoint(session):
                yield session
            await savepoint.commit()
        except BaseException:
            await savepoint.rollback()
            raise

    overrides: dict[Any, Any] = app.dependency_overrides
    replaced = {
        dependency: overrides.get(dependency, _ABSENT) for dependency in (get_db, get_read_db)
    }
    overrides[get_db] = test_session
    overrides[get_read_db] = test_read_session

    def undo() -> None:
        for dependency, previous in replaced.items():
            # Only what is still ours: a later override of the test's own stays.
            if overrides.get(dependency) not in (test_session, test_read_session):
                continue
            if previous is _ABSENT:
                del overrides[dependency]
            else:
                overrides[dependency] = previous

    at_end = _UNDO_AT_END.get(bind) if isinstance(bind, Connection) else None
    if at_end is not None:
        at_end.append(undo)
    return undo
