"""The item routes on PostgreSQL, each test isolated by the rollback fixture."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

# Collected here with this directory's `client` (the rollback fixture).
from tests.item_routes import *  # noqa: F403  (pytest collects the imported tests)


async def test_other_integrity_errors_are_not_reported_as_409(
    client: httpx.AsyncClient, db_session: AsyncSession
) -> None:
    """Only the unique name maps to 409; another violated constraint surfaces as an error."""
    # DDL is transactional in PostgreSQL: the outer rollback removes this constraint.
    await db_session.execute(
        text("ALTER TABLE items ADD CONSTRAINT ck_items_test CHECK (name <> 'forbidden')")
    )
    await db_session.commit()

    with pytest.raises(IntegrityError, match="ck_items_test"):
        await client.post("/items", json={"name": "forbidden"})
