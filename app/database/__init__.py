"""Async SQLAlchemy session management with lifecycle control and FastAPI integration.

`get_db` and `AsyncSessionDep` are loaded on first use, so the package imports
(and `session_manager.session()` works) where FastAPI is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._base import Base
from ._classify import DatabaseErrorKind, classify_error
from ._errors import (
    DatabaseAlreadyInitializedError,
    DatabaseConfigError,
    DatabaseNotInitializedError,
    PoolExhaustedError,
    TransactionAbortedError,
    TransactionPoolerError,
)
from ._manager import DatabaseSessionManager, session_manager

if TYPE_CHECKING:
    from ._fastapi import AsyncSessionDep, get_db

__all__ = [
    "AsyncSessionDep",
    "Base",
    "DatabaseAlreadyInitializedError",
    "DatabaseConfigError",
    "DatabaseErrorKind",
    "DatabaseNotInitializedError",
    "DatabaseSessionManager",
    "PoolExhaustedError",
    "TransactionAbortedError",
    "TransactionPoolerError",
    "classify_error",
    "get_db",
    "session_manager",
]

_FASTAPI_NAMES = frozenset({"AsyncSessionDep", "get_db"})


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
