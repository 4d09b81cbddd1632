"""Async SQLAlchemy session management with lifecycle control and FastAPI integration.

`get_db` and `AsyncSessionDep` are loaded on first use, so the package imports
(and `session_manager.session()` works) where FastAPI is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import Base
from ._classify import DatabaseErrorKind, classify_error
from ._errors import (
    CommitOutcomeUnknownError,
    DatabaseAlreadyInitializedError,
    DatabaseConfigError,
    DatabaseNotInitializedError,
    PoolExhaustedError,
    TransactionAbortedError,
    TransactionPoolerError,
)
from ._manager import DatabaseSessionManager, session_manager
from ._on_commit import on_commit

if TYPE_CHECKING:
    from ._fastapi import (
        AsyncSessionDep,
        RetryingRoute,
        get_db,
        retrying_route_class,
        session_dependency,
    )

__all__ = [
    "AsyncSessionDep",
    "Base",
    "CommitOutcomeUnknownError",
    "DatabaseAlreadyInitializedError",
    "DatabaseConfigError",
    "DatabaseErrorKind",
    "DatabaseNotInitializedError",
    "DatabaseSessionManager",
    "PoolExhaustedError",
    "RetryingRoute",
    "TransactionAbortedError",
    "TransactionPoolerError",
    "classify_error",
    "get_db",
    "on_commit",
    "retrying_route_class",
    "session_dependency",
    "session_manager",
]

_FASTAPI_NAMES = frozenset(
    {"AsyncSessionDep", "RetryingRoute", "get_db", "retrying_route_class", "session_dependency"}
)


def __getattr__(name: str) -> Any:
    if name in _FASTAPI_NAMES:
        try:
            from . import _fastapi
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                f"{name} needs FastAPI: install 'fastapi>=0.121.1', or, outside a "
                "FastAPI app, use `session_manager.session()`, which does not",
                name=error.name,
            ) from error
        return getattr(_fastapi, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
