"""The rollback fixture: route commits stay inside the test's outer transaction."""

from __future__ import annotations

import asyncpg
import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.models import Item


async def test_route_commit_is_invisible_outside_the_test(
    client: httpx.AsyncClient, db_session: AsyncSession, observer: asyncpg.Connection
) -> None:
    """A route's commit releases a savepoint only: another connection sees nothing."""
    response = await client.post("/items", json={"name": "isolated"})
    assert response.status_code == 201

    seen_by_test = await db_session.scalar(select(Item.name).where(Item.name == "isolated"))
    seen_outside = await observer.fetchval("SELECT count(*) FROM items WHERE name = 'isolated'")

    assert seen_by_test == "isolated"
    assert seen_outside == 0


async def test_route_rollback_keeps_the_tests_own_data(
    client: httpx.AsyncClient, db_session: AsyncSession
) -> None:
    """A route that fails rolls back its savepoint, not the test's committed setup data."""
    db_session.add(Item(name="fixture-data"))
    # Setup shares the route's session: commit() it (releasing a savepoint) so that
    # the route's rollback cannot take it along.
    await db_session.commit()

    response = await client.post("/items", json={"name": "fixture-data"})

    assert response.status_code == 409
    names = (await db_session.scalars(select(Item.name))).all()
    assert names == ["fixture-data"]


async def test_session_stays_usable_after_a_failed_request(
    client: httpx.AsyncClient,
) -> None:
    """After a 409 the same test can go on writing through the routes."""
    assert (await client.post("/items", json={"name": "twice"})).status_code == 201
    assert (await client.post("/items", json={"name": "twice"})).status_code == 409

    response = await client.post("/items", json={"name": "after"})

    assert response.status_code == 201
    listed = (await client.get("/items")).json()
    assert [item["name"] for item in listed["items"]] == ["twice", "after"]
