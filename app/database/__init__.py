"""Async SQLAlchemy session management with lifecycle control and FastAPI integration.

`get_db` and `AsyncSessionDep` are loaded on first use, so the package imports
(and `session_manager.session()` works) where FastAPI is not installed; so are
`enable_telemetry` and `disable_telemetry`, which need the `otel` extra: without
it both import, `enable_telemetry()` raises `ModuleNotFoundError` naming the extra,
and `disable_telemetry()` has nothing to do.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from ._base import NAMING_CONVENTION, Base
from ._classify import DatabaseErrorKind, classify_error
from ._errors import (
    CommitOutcomeUnknownError,
    DatabaseAlreadyInitializedError,
    DatabaseConfigError,
    DatabaseNotInitializedError,
    PoolExhaustedError,
    ReadOnlyTransactionError,
    TransactionAbortedError,
    TransactionPoolerError,
)
from ._manager import DatabaseSessionManager, session_manager
from ._on_commit import on_commit
from ._read_your_writes import ReadYourWritesMiddleware
from ._slow_units import log_slow_units
from ._sqlalchemy_release import UnsupportedSQLAlchemyWarning

if TYPE_CHECKING:
    from ._fastapi import (
        AsyncSessionDep,
        ReadSessionDep,
        RetryingRoute,
        get_db,
        get_read_db,
        retrying_route_class,
        session_dependency,
    )
    from ._telemetry import disable_telemetry, enable_telemetry

__all__ = [
    "NAMING_CONVENTION",
    "AsyncSessionDep",
    "Base",
    "CommitOutcomeUnknownError",
    "DatabaseAlreadyInitializedError",
    "DatabaseConfigError",
    "DatabaseErrorKind",
    "DatabaseNotInitializedError",
    "DatabaseSessionManager",
    "PoolExhaustedError",
    "ReadOnlyTransactionError",
    "ReadSessionDep",
    "ReadYourWritesMiddleware",
    "RetryingRoute",
    "TransactionAbortedError",
    "TransactionPoolerError",
    "UnsupportedSQLAlchemyWarning",
    "classify_error",
    "disable_telemetry",
    "enable_telemetry",
    "get_db",
    "get_read_db",
    "log_slow_units",
    "on_commit",
    "retrying_route_class",
    "session_dependency",
    "session_manager",
]

_FASTAPI_NAMES = frozenset(
    {
        "AsyncSessionDep",
        "ReadSessionDep",
        "RetryingRoute",
        "get_db",
        "get_read_db",
        "retrying_route_class",
        "session_dependency",
    }
)


_TELEMETRY_NAMES = frozenset({"disable_telemetry", "enable_telemetry"})


def __getattr__(name: str) -> Any:
    # Imported on first use (importlib, not an import statement inside a function,
    # which hosts' linters flag): FastAPI and OpenTelemetry are optional.
    if name in _FASTAPI_NAMES:
        try:
            fastapi_module = importlib.import_module(f"{__name__}._fastapi")
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                f"{name} needs FastAPI: install 'fastapi>=0.121.1', or, outside a "
                "FastAPI app, use `session_manager.session()`, which does not",
                name=error.name,
            ) from error
        return getattr(fastapi_module, name)
    if name in _TELEMETRY_NAMES:
        try:
            telemetry_module = importlib.import_module(f"{__name__}._telemetry")
        except ModuleNotFoundError as error:
            if name == "disable_telemetry":
                return _nothing_to_disable  # nothing can have been enabled
            return _needs_otel_extra(name, error)
        return getattr(telemetry_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _nothing_to_disable() -> None:
    """`disable_telemetry` without the `otel` extra: a shutdown that calls it always works."""


def _needs_otel_extra(name: str, missing: ModuleNotFoundError) -> Callable[..., NoReturn]:
    """What `name` is without the `otel` extra: importing it (or `import *`) works, so a
    service imports the package the same way with or without it; calling it says what
    to install."""

    def needs_otel_extra(*_args: object, **_kwargs: object) -> NoReturn:
        raise ModuleNotFoundError(
            f"{name} needs OpenTelemetry's SQLAlchemy instrumentation: install "
            "'fastapi-db-session[otel]' (or opentelemetry-instrumentation-sqlalchemy); "
            "the rest of the package works without it",
            name=missing.name,
        ) from missing

    needs_otel_extra.__name__ = needs_otel_extra.__qualname__ = name
    return needs_otel_extra
