"""Signs that something was abandoned: log records, warnings and unraisable exceptions that say a
task, a coroutine or a connection was left behind, collected around a cancellation run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import warnings
from collections.abc import Iterator

# Log lines that mean a task, a coroutine or a connection was abandoned.
NOISE = (
    "exception was never retrieved",
    "Task was destroyed but it is pending",
    "garbage collector",
    "Event loop is closed",
    "was never awaited",
    "attached to a different loop",
)
# Listened to down to DEBUG, where they say a connection or a task was abandoned;
# every other logger (the drivers' too: psycopg warns when a cancellation of its
# own fails) is listened to at its usual level, WARNING.
NOISE_LOGGERS = ("asyncio", "sqlalchemy.pool", "uvicorn.error")
# asyncpg 0.32 (sslmode=prefer, its default) sets an exception nobody reads on its
# SSL-negotiation future when a connect() is cancelled: "Future exception was never
# retrieved ... ConnectionError('unexpected connection_lost() call')". Plain asyncpg
# shows it too (64 of 284 cancelled connects; none with ssl=False), and nothing
# leaks, so it is counted apart instead of failing the run.
ASYNCPG_CONNECT_NOISE = "unexpected connection_lost() call"


def noise_in(records: list[logging.LogRecord]) -> list[str]:
    """Log records that are warnings or errors, or that say something was abandoned."""
    found = []
    for record in records:
        message = record.getMessage()
        if record.levelno >= logging.WARNING or any(marker in message for marker in NOISE):
            found.append(f"{record.name} {record.levelname}: {message[:300]}")
    return found


def split_noise(lines: list[str]) -> tuple[list[str], int]:
    """The noise lines that break the promise, and how many were asyncpg's connect noise."""
    known = [line for line in lines if ASYNCPG_CONNECT_NOISE in line]
    return [line for line in lines if line not in known], len(known)


def _warning_lines(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def collected_garbage_warnings() -> list[str]:
    """Warnings (ResourceWarning, SAWarning, ...) that a full garbage collection emits."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return _warning_lines(caught)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._seen: set[int] = set()  # ids of the records kept (alive, so unique)

    def emit(self, record: logging.LogRecord) -> None:
        if id(record) not in self._seen:  # once, whichever logger passed it on
            self._seen.add(id(record))
            self.records.append(record)


@contextlib.contextmanager
def collecting_noise() -> Iterator[list[str]]:
    """For the soak: log records, warnings and unraisable exceptions, as `noise_in` lines.

    The list is filled when the block exits.
    """
    # On the root logger, as pytest's caplog, for every logger's records; and on the
    # noise loggers themselves, which may stop propagating (uvicorn's do once it runs).
    handler = _Records()
    loggers = [logging.getLogger(name) for name in NOISE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in [logging.getLogger(), *loggers]:
        logger.addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    unraisable: list[str] = []
    previous_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: unraisable.append(f"unraisable: {u.exc_value!r}")
    found: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        sys.unraisablehook = previous_hook
        logging.getLogger().removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    found += noise_in(handler.records)
    found += _warning_lines(caught)
    found += unraisable
