"""Fixtures for the unit tests, which need no database server."""

from __future__ import annotations

import pytest

from app.database import DatabaseSessionManager


@pytest.fixture(name="manager")
def manager_fixture() -> DatabaseSessionManager:
    """A fresh manager, independent of the app's singleton."""
    return DatabaseSessionManager()
