"""Run only by name: a test that commits outside the isolation, which the plugin reports."""

from __future__ import annotations

from sqlalchemy import insert

from shop.core.database import DatabaseSessionManager
from shop.models import User


async def test_commits_through_the_engine(database: DatabaseSessionManager) -> None:
    async with database.engine.begin() as connection:
        await connection.execute(insert(User).values(email="leaked@example.com"))
