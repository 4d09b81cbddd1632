"""How long sessions wait for a pooled connection, how many wait, how many give up.

SQLAlchemy's pool has no event before a checkout, only after one: so each watched
pool's `connect()` is wrapped on the instance (nothing global is patched), and
the time from its start to the first `checkout` listener is the wait. That
includes opening a new connection when the pool had room, and the checks of
connections found dead on the way; not the liveness check of the connection
handed out, which runs after. Installed only once an observer is turned on.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection

from . import _signals as signals
from ._units import current_unit

# In a pooled connection's `info`: the name of its pool, for observers of events
# that see only the connection (liveness, session-state resets); and when its
# current checkout obtained it.
_POOL_NAME = "app.database.pool_name"
_OBTAINED_AT = "app.database.obtained_at"


class PoolWatch:
    """One engine's pool, as observed: its name and the sessions inside its checkout now."""

    __slots__ = ("__weakref__", "engine", "name", "waiting")

    def __init__(self, engine: Engine) -> None:
        self.engine: weakref.ref[Engine] = weakref.ref(engine)
        self.name = pool_name(engine)
        self.waiting = 0


_watches: weakref.WeakKeyDictionary[Engine, PoolWatch] = weakref.WeakKeyDictionary()


def pool_name(engine: Engine) -> str:
    """The pool's name as OpenTelemetry's SQLAlchemy instrumentation reports it
    (`pool_logging_name`, else driver, host, port and database): never credentials."""
    url = engine.url
    given: str | None = getattr(engine.pool, "logging_name", None)
    return given or f"{url.drivername}://{url.host or ''}:{url.port or ''}/{url.database or ''}"


def pool_name_of(record: ConnectionPoolEntry) -> str | None:
    """The name of the watched pool `record` belongs to; None before its first watched checkout."""
    name: str | None = record.info.get(_POOL_NAME)
    return name


def watches() -> list[PoolWatch]:
    """Every watched pool whose engine is alive and not closed by its manager."""
    live = {engine for engine, _ in signals.live_engines()}
    return [watch for engine, watch in list(_watches.items()) if engine in live]


def watch_pool(engine: Engine) -> None:
    """Time each checkout of `engine`'s pool and count its waiters; idempotent."""
    if engine in _watches:
        return
    watch = _watches[engine] = PoolWatch(engine)
    name = watch.name

    def obtained(_: Any, record: ConnectionPoolEntry, __: PoolProxiedConnection) -> None:
        info = record.info
        info[_OBTAINED_AT] = time.perf_counter()
        if _POOL_NAME not in info:
            info[_POOL_NAME] = name

    # insert=True: ahead of the liveness check, whose ping is not waiting for the pool.
    event.listen(engine, "checkout", obtained, insert=True)
    # dispose() replaces the pool (the close() drain does, so do callers who fork).
    event.listen(engine, "engine_disposed", lambda disposed: _wrap(disposed.pool, watch))
    _wrap(engine.pool, watch)


def _wrap(pool: Pool, watch: PoolWatch) -> None:
    if "connect" in vars(pool):
        return  # already wrapped
    checkout: Callable[[], PoolProxiedConnection] = pool.connect

    def connect() -> PoolProxiedConnection:
        watch.waiting += 1
        started = time.perf_counter()
        try:
            connection = checkout()
        except exc.TimeoutError:
            if signals.pool_timed_out:
                signals.pool_timed_out(watch.name)
            raise
        finally:
            watch.waiting -= 1
        obtained = connection.info.pop(_OBTAINED_AT, None)
        waited = (time.perf_counter() if obtained is None else obtained) - started
        unit = current_unit()
        if unit is not None:
            unit.pool_wait += waited
        if signals.pool_waited:
            signals.pool_waited(watch.name, waited)
        return connection

    pool.connect = connect  # type: ignore[method-assign]
