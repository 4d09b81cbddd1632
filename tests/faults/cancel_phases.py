"""The phases a cancelled unit of work can be in: an `Iteration` knows its phase and when to
cancel itself, and `phase_probe` moves it along through SQLAlchemy's events and, for the end of
BEGIN, the driver's own (tests/drivers.py `on_begin_done`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from app.database import _liveness
from tests.drivers import on_begin_done

# Phases a cancellation can land in, in the order a unit of work passes them:
# waiting for a pooled (or new) connection; the liveness ping on checkout; BEGIN in
# flight; a statement in flight; application code between statements; COMMIT in
# flight; closing the session (the rollback or reset that returns the connection).
PHASES = ("checkout", "ping", "begin", "statement", "between", "commit", "close")
# Before the route's first statement ("request", HTTP styles only), and after the
# connection went back to the pool ("after": nothing left to leak, not counted).
EDGES = ("request", "after")


@dataclass
class Iteration:
    """One unit of work, the phase it has reached, and when to cancel it."""

    style: str
    number: int
    target: str  # a phase of PHASES, or "any"
    offset: float  # seconds after the target phase starts
    fail: bool
    hold_pool: bool  # other holders saturate the pool, so checkout has to wait
    phase: str = "request"
    landed: str | None = None  # the phase the cancellation was delivered in
    outcome: str = "pending"  # completed | failed | cancelled | error: ...
    began: bool = False  # BEGIN of the current checkout has completed
    client_gone: bool = False  # HTTP: the client reset its connection before the response
    cancel: Callable[[], Any] | None = None
    server_done: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self, phase: str) -> None:
        """Record that the unit of work reached `phase`; arm the cancellation there."""
        self.phase = phase
        if phase == self.target or self.target == "any":  # "any": from the very start
            self.target = ""  # arm once
            loop = asyncio.get_running_loop()
            if self.offset <= 0:
                loop.call_soon(self.fire)  # at the phase's first await
            else:
                loop.call_later(self.offset, self.fire)

    def fire(self) -> None:
        """Deliver the cancellation, noting the phase it lands in."""
        self.landed = self.phase
        if self.cancel is not None:
            self.cancel()


_CURRENT: ContextVar[Iteration | None] = ContextVar("h2_cancel_iteration", default=None)


def track(iteration: Iteration, phase: str) -> None:
    """Make `iteration` the unit of work the probes follow in this task, now in `phase`."""
    # A context variable, because the events fire inside the unit of work's task, or
    # in SQLAlchemy's cleanup task created from it: both see its context.
    _CURRENT.set(iteration)
    iteration.enter(phase)


def _enter(phase: str) -> None:
    iteration = _CURRENT.get()
    if iteration is not None:
        iteration.enter(phase)


def _watch_begin(dbapi_connection: Any, _: Any) -> None:
    # The end of BEGIN is the start of the statement that caused it, which no
    # SQLAlchemy event marks: the driver tells.
    on_begin_done(dbapi_connection.driver_connection, _begin_done)


def _begin_done() -> None:
    iteration = _CURRENT.get()
    if iteration is not None and iteration.phase == "begin":
        iteration.began = True
        iteration.enter("statement")


def _checkout_starts(*_: Any) -> None:
    _enter("ping")  # inserted before the package's own checkout listener, which pings


def _checked_out(*_: Any) -> None:
    iteration = _CURRENT.get()
    if iteration is not None:
        iteration.began = False  # the first statement on this checkout sends BEGIN
        iteration.enter("begin")


def _statement_starts(*_: Any) -> None:
    iteration = _CURRENT.get()
    if iteration is not None and iteration.began:
        iteration.enter("statement")


@contextlib.contextmanager
def phase_probe(engine: AsyncEngine) -> Iterator[None]:
    """Record the phase each unit of work reaches, through `engine`'s events."""
    sync_engine = engine.sync_engine
    listeners: list[tuple[Any, str, Callable[..., None], dict[str, bool]]] = [
        (sync_engine.pool, "connect", _watch_begin, {}),
        (sync_engine, "checkout", _checkout_starts, {"insert": True}),
        (sync_engine, "checkout", _checked_out, {}),
        (sync_engine, "before_cursor_execute", _statement_starts, {}),
        (sync_engine, "after_cursor_execute", lambda *_: _enter("between"), {}),
        (sync_engine, "commit", lambda *_: _enter("commit"), {}),
        (sync_engine, "rollback", lambda *_: _enter("close"), {}),
        (sync_engine, "checkin", lambda *_: _enter("after"), {}),
    ]
    for target, name, function, options in listeners:
        event.listen(target, name, function, **options)
    # Every checkout pings (the package skips connections used within the last
    # second, which here would be nearly all of them): the ping is a phase too.
    fresh_seconds = _liveness.FRESH_SECONDS
    _liveness.FRESH_SECONDS = 0.0
    try:
        yield
    finally:
        _liveness.FRESH_SECONDS = fresh_seconds
        for target, name, function, _options in listeners:
            event.remove(target, name, function)
