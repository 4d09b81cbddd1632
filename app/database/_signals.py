"""Hooks the core calls at the moments worth observing; nothing listens unless asked.

The core imports nothing from OpenTelemetry. `_telemetry.py` (traces and metrics)
and `_slow_units.py` (the slow-unit log) connect listeners here when they are
turned on. A call site tests its hook before calling it (`if hook: hook(...)`),
so with nobody listening a hook costs one truth test and builds no arguments.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, ParamSpec

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry

if TYPE_CHECKING:
    from ._units import Unit

P = ParamSpec("P")

# Named after the package, wherever the service put it (app.database here).
logger = logging.getLogger(__package__)


class Hook(list[Callable[P, object]]):
    """Listeners called in order; true while at least one is connected.

    A list, so that the call sites' truth test is the interpreter's own list
    length check (about 20 ns), not a Python-level `__bool__`.
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def connect(self, listener: Callable[P, object]) -> None:
        if listener not in self:
            self.append(listener)

    def disconnect(self, listener: Callable[P, object]) -> None:
        while listener in self:
            self.remove(listener)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> None:
        # A copy: a listener connected or disconnected meanwhile waits for the next call.
        for listener in tuple(self):
            try:
                listener(*args, **kwargs)
            except Exception:
                # Observing a unit of work must never fail it: the pool events and
                # the session's exit these run in would turn this into its error.
                logger.exception("a listener of the %s hook failed", self.name)


# An engine the package built for a manager, and its role ("primary", "replica").
engine_built: Hook[[Engine, str]] = Hook("engine_built")
# A unit of work began (session() entered) / ended, its `Unit` filled in.
unit_started: Hook[[Unit]] = Hook("unit_started")
unit_ended: Hook[[Unit]] = Hook("unit_ended")
# run_in_transaction or a RetryingRoute runs a unit again: what, the attempt that
# failed (1-based), and its error.
unit_retried: Hook[[str, int, BaseException]] = Hook("unit_retried")
# A session waited this many seconds for a pooled connection of the named pool.
pool_waited: Hook[[str, float]] = Hook("pool_waited")
# A session gave up waiting (pool_timeout): PoolExhaustedError follows.
pool_timed_out: Hook[[str]] = Hook("pool_timed_out")
# The liveness check at checkout: "alive" (pinged, answered), "ping_failed" or
# "closed" (the driver saw it closed); the last two discard the connection.
liveness_checked: Hook[[ConnectionPoolEntry, str]] = Hook("liveness_checked")
# A connection that changed session state came back: "reset", "closed" (nothing
# can undo what it did, or no I/O was allowed) or "failed" (the reset failed: closed).
session_state_reset: Hook[[ConnectionPoolEntry, str]] = Hook("session_state_reset")

# Every engine announced, not yet retired and still alive, with its role: an observer
# turned on after init() finds the engines it missed here.
_engines: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def announce_engine(engine: Engine, role: str) -> None:
    """Called by the manager for each engine it builds (not the replicas' probe engines)."""
    _engines[engine] = role
    if engine_built:
        engine_built(engine, role)


def announce_engines(primary: AsyncEngine, replicas: Iterable[AsyncEngine]) -> None:
    """`announce_engine` for a manager's primary and each of its replicas."""
    announce_engine(primary.sync_engine, "primary")
    for replica in replicas:
        announce_engine(replica.sync_engine, "replica")


def retire_engines(primary: AsyncEngine, replicas: Iterable[AsyncEngine]) -> None:
    """Called by the manager's close() once it has disposed of its engines: observers
    stop reporting them (the objects live on until collected, and a manager opened
    next may reuse their pool's name)."""
    for engine in (primary.sync_engine, *(replica.sync_engine for replica in replicas)):
        _engines.pop(engine, None)


def live_engines() -> Iterator[tuple[Engine, str]]:
    """The announced engines neither retired nor garbage-collected, with their roles."""
    return iter(list(_engines.items()))


def watch_engines(listener: Callable[[Engine, str], object]) -> None:
    """Call `listener` for each live engine now, and for each one built from now on."""
    for engine, role in live_engines():
        listener(engine, role)
    engine_built.connect(listener)
