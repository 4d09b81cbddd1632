"""Re-running a unit of work that lost to a concurrent transaction (40001, 40P01).

PostgreSQL rolled such a transaction back whole, so running the same work again
in a new transaction is safe, as long as the work has no side effect outside the
database except through `on_commit` (README, "Transactions").
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from . import _signals as signals
from ._classify import DatabaseErrorKind, classify_error
from ._errors import DatabaseConfigError
from ._guards import GuardedSession

T = TypeVar("T")

DEFAULT_ATTEMPTS = 3
# Full jitter: attempt n waits a random time up to min(MAX, BASE * 2**(n-1)), so
# units that collided once do not collide again in lockstep.
RETRY_BASE_SECONDS = 0.01
RETRY_MAX_SECONDS = 0.5

# Named after the package, wherever the service put it (app.database here).
logger = logging.getLogger(__package__)

# Set while an attempt runs: the sessions it opens (session(), get_db) belong to a
# unit of work that may run again, so they must not commit before its end.
_retried_unit: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "app.database.retried_unit", default=False
)
# In Session.info: a session of a retried unit, and its one allowed commit, the last.
_RETRIED = "app.database.retried_unit"
_FINAL_COMMIT = "app.database.final_commit"


def in_retried_unit() -> bool:
    """Whether the running code is an attempt of run_in_transaction or RetryingRoute."""
    return _retried_unit.get()


def forbid_intermediate_commits(session: AsyncSession) -> None:
    """Refuse `session.commit()` before the unit's own final commit (see below)."""
    session.sync_session.info[_RETRIED] = True


def allow_final_commit(session: AsyncSession) -> None:
    """Mark the commit about to happen as the unit of work's own, at its end."""
    session.sync_session.info[_FINAL_COMMIT] = True


def final_commit_started(session: AsyncSession) -> bool:
    """Whether the unit's own commit was reached (its flush succeeded), for observers."""
    return bool(session.sync_session.info.get(_FINAL_COMMIT))


@event.listens_for(GuardedSession, "before_commit")
def _refuse_intermediate_commit(session: Session) -> None:
    # A retry runs the whole work again: what an earlier commit() of the failed
    # attempt stored (and its on_commit callbacks did) would happen twice.
    if (
        session.info.get(_RETRIED)
        and not session.info.get(_FINAL_COMMIT)
        and not session.in_nested_transaction()
    ):
        raise RuntimeError(
            "session.commit() inside run_in_transaction() or a RetryingRoute: a retry "
            "would run the work again and apply what this commit stored twice; let "
            "the unit of work commit at its end (use flush() for generated ids, "
            "begin_nested() for a part that may fail)"
        )


def check_attempts(attempts: object) -> int:
    """`attempts` if it is a whole number of at least 1, else DatabaseConfigError."""
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise DatabaseConfigError(
            f"attempts must be a whole number of at least 1 (1: no retry), got {attempts!r}"
        )
    return attempts


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based)."""
    return random.uniform(0, min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempt - 1)))


async def run_with_retries(run: Callable[[], Awaitable[T]], attempts: int, what: str) -> T:
    """Await `run()`, again after a serialization failure or deadlock, `attempts` times at most.

    Any other error, and the last attempt's, propagates unchanged. A lost
    connection is never retried: it is not RETRYABLE (README, "Transactions").
    """
    for attempt in range(1, attempts + 1):
        token = _retried_unit.set(True)
        try:
            return await run()
        except Exception as error:
            if attempt == attempts or classify_error(error) is not DatabaseErrorKind.RETRYABLE:
                raise
            if signals.unit_retried:
                signals.unit_retried(what, attempt, error)
            logger.info(
                "%s lost to a concurrent transaction (%s); running it again, attempt %d of %d",
                what,
                type(error).__name__,
                attempt + 1,
                attempts,
            )
        finally:
            _retried_unit.reset(token)
        await asyncio.sleep(retry_delay(attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")
