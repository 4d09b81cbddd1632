"""Re-running a unit of work that lost to a concurrent transaction (40001, 40P01).

PostgreSQL rolled such a transaction back whole, so running the same work again
in a new transaction is safe, as long as the work has no side effect outside the
database except through `on_commit` (README, "Transactions").
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._classify import DatabaseErrorKind, classify_error
from ._errors import DatabaseConfigError

T = TypeVar("T")

DEFAULT_ATTEMPTS = 3
# Full jitter: attempt n waits a random time up to min(MAX, BASE * 2**(n-1)), so
# units that collided once do not collide again in lockstep.
RETRY_BASE_SECONDS = 0.01
RETRY_MAX_SECONDS = 0.5

logger = logging.getLogger("app.database")


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
        try:
            return await run()
        except Exception as error:
            if attempt == attempts or classify_error(error) is not DatabaseErrorKind.RETRYABLE:
                raise
            logger.info(
                "%s lost to a concurrent transaction (%s); running it again, attempt %d of %d",
                what,
                type(error).__name__,
                attempt + 1,
                attempts,
            )
        await asyncio.sleep(retry_delay(attempt))
    raise AssertionError("unreachable: the last attempt returns or raises")
