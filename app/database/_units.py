"""What a unit of work did, for its observers: outcome, duration, statements, pool wait.

`observed_unit` wraps `DatabaseSessionManager.session()`. While no observer is
connected to `unit_started` or `unit_ended` it hands back the plain unit, so the
request path pays one function call and a truth test. Otherwise each unit gets
a `Unit`, current (a context variable) while it runs, which the statement counter
and the pool's checkout timing (`_pool_wait.py`) add to.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Any, ParamSpec

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession

from . import _signals as signals
from ._errors import CommitOutcomeUnknownError, TransactionAbortedError
from ._retry import final_commit_started

P = ParamSpec("P")

# Named after the package, wherever the service put it (app.database here).
logger = logging.getLogger(__package__)

COMMITTED = "committed"
ROLLED_BACK = "rolled_back"
# COMMIT was sent and the server refused it (a deferred constraint, a serialization
# failure at commit): nothing was written.
COMMIT_FAILED = "commit_failed"
# COMMIT was sent and no answer came: CommitOutcomeUnknownError.
COMMIT_OUTCOME_UNKNOWN = "commit_outcome_unknown"
OUTCOMES = (COMMITTED, ROLLED_BACK, COMMIT_FAILED, COMMIT_OUTCOME_UNKNOWN)


class Unit:
    """One unit of work as its observers see it; filled in as it runs."""

    __slots__ = (
        "duration",
        "error",
        "finishers",
        "outcome",
        "pool_wait",
        "read_only",
        "started",
        "statements",
    )

    def __init__(self, read_only: bool) -> None:
        self.read_only = read_only
        self.started = time.perf_counter()
        self.statements = 0  # sent through SQLAlchemy, the package's own included
        self.pool_wait = 0.0  # seconds waiting for pooled connections, every checkout
        self.outcome: str | None = None
        self.duration = 0.0  # seconds, from entering session() to the connection's return
        self.error: BaseException | None = None  # what ended it, if not a commit
        # Called at its end before `unit_ended`, even by an observer turned off
        # meanwhile: what a `unit_started` listener opened (a span) is always closed.
        self.finishers: list[Callable[[Unit], object]] = []


_current: ContextVar[Unit | None] = ContextVar("app.database.current_unit", default=None)


def current_unit() -> Unit | None:
    """The observed unit of work running in this context, if any."""
    return _current.get()


def observed_unit(
    open_unit: Callable[P, AbstractAsyncContextManager[AsyncSession]],
) -> Callable[P, AbstractAsyncContextManager[AsyncSession]]:
    """Decorates `session()`: its units are observed while anyone listens."""

    @functools.wraps(open_unit)
    def session(*args: P.args, **kwargs: P.kwargs) -> AbstractAsyncContextManager[AsyncSession]:
        unit = open_unit(*args, **kwargs)
        if not (signals.unit_started or signals.unit_ended):
            return unit
        return _ObservedUnit(unit, read_only=bool(kwargs.get("read_only", False)))

    return session


class _ObservedUnit(AbstractAsyncContextManager[AsyncSession]):
    __slots__ = ("_inner", "_session", "_token", "_unit")

    def __init__(self, inner: AbstractAsyncContextManager[AsyncSession], read_only: bool) -> None:
        self._inner = inner
        self._unit = Unit(read_only)
        self._session: AsyncSession | None = None
        self._token: Token[Unit | None] | None = None

    async def __aenter__(self) -> AsyncSession:
        unit = self._unit
        unit.started = time.perf_counter()
        self._token = _current.set(unit)
        if signals.unit_started:
            signals.unit_started(unit)
        try:
            self._session = await self._inner.__aenter__()
        except BaseException as error:
            self._end(ROLLED_BACK, error)
            raise
        return self._session

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        try:
            suppressed = await self._inner.__aexit__(exc_type, exc, traceback)
        except BaseException as error:
            self._end(ROLLED_BACK if exc is not None else _failed_end(self._session, error), error)
            raise
        self._end(COMMITTED if exc is None else ROLLED_BACK, exc)
        return suppressed

    def _end(self, outcome: str, error: BaseException | None) -> None:
        unit = self._unit
        unit.duration = time.perf_counter() - unit.started
        unit.outcome = outcome
        unit.error = error
        if self._token is not None:
            # ValueError: exited in another context than it was entered in (a
            # finalizer), where this unit is not current anyway.
            with contextlib.suppress(ValueError):
                _current.reset(self._token)
        for finish in unit.finishers:
            try:
                finish(unit)
            except Exception:
                logger.exception("finishing an observed unit of work failed")
        if signals.unit_ended:
            signals.unit_ended(unit)


def _failed_end(session: AsyncSession | None, error: BaseException) -> str:
    """The outcome of a unit whose block ran through but whose end raised `error`."""
    if isinstance(error, CommitOutcomeUnknownError):
        return COMMIT_OUTCOME_UNKNOWN
    if isinstance(error, TransactionAbortedError) or session is None:
        return ROLLED_BACK  # refused before COMMIT was sent
    # Past the flush, COMMIT itself failed; a failed flush committed nothing either.
    return COMMIT_FAILED if final_commit_started(session) else ROLLED_BACK


def _count_statement(*_: Any) -> None:
    unit = _current.get()
    if unit is not None:
        unit.statements += 1


_counted: weakref.WeakSet[Engine] = weakref.WeakSet()


def count_statements(engine: Engine) -> None:
    """Count each statement `engine` sends into the current unit; idempotent."""
    if engine not in _counted:
        _counted.add(engine)
        event.listen(engine, "before_cursor_execute", _count_statement)
