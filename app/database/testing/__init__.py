"""Test isolation on a real database: each test runs in one transaction, rolled back at its end.

While `isolated()` is active, every session the manager hands out (through
`session()`, `get_db` or `AsyncSessionDep`) joins that transaction through a
savepoint, so route code, CLI functions and background jobs are isolated alike,
and their `commit()` only releases a savepoint. Imports neither pytest nor
FastAPI; `pytest_plugin.py` wraps it in fixtures.
"""

from __future__ import annotations

from ._databases import DatabaseSetupError, create_test_database, drop_test_database
from ._isolation import IsolationError, isolated, joined_session, share_session_with_app
from ._on_commit import capture_on_commit_callbacks
from ._query_count import QueryCount, count_queries

__all__ = [
    "DatabaseSetupError",
    "IsolationError",
    "QueryCount",
    "capture_on_commit_callbacks",
    "count_queries",
    "create_test_database",
    "drop_test_database",
    "isolated",
    "joined_session",
    "share_session_with_app",
]
