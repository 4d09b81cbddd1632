"""Which engines carry the observers' listeners: a statement counter and the pool's timing.

Installed on every engine the package builds while at least one observer (the
telemetry, the slow-unit log) is on. Engines that already have them keep them
after the last observer is turned off: with no unit observed, they find nothing
to add to.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from . import _signals as signals
from ._pool_wait import watch_pool
from ._units import count_statements

_observers: set[str] = set()


def observe_engines(observer: str) -> None:
    """`observer` needs statement counts and pool waits, on every engine from now on."""
    _observers.add(observer)
    signals.watch_engines(_observe)


def stop_observing_engines(observer: str) -> None:
    """`observer` is off; new engines get the listeners only while another is on."""
    _observers.discard(observer)
    if not _observers:
        signals.engine_built.disconnect(_observe)


def _observe(engine: Engine, _role: str) -> None:
    count_statements(engine)
    watch_pool(engine)
