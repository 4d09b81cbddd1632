"""The service's own tests, unchanged by the adoption but for the fixtures' names."""

from __future__ import annotations

import logging

import httpx
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncSession

from shop.main import app
from shop.models import User

OK = 200
CREATED = 201


async def _users(db_session: AsyncSession) -> int:
    count = await db_session.scalar(select(func.count()).select_from(User))
    return count or 0


async def test_a_a_created_user_is_seen_by_the_test(
    client: httpx.AsyncClient, db_session: AsyncSession
) -> None:
    response = await client.post("/users", params={"email": "ada@example.com"})
    assert response.status_code == CREATED, response.text
    assert await _users(db_session) == 1


async def test_b_the_previous_test_left_nothing(db_session: AsyncSession) -> None:
    assert await _users(db_session) == 0


async def test_c_a_shared_session_sees_the_test_rows(
    shared_client: httpx.AsyncClient, db_session: AsyncSession
) -> None:
    user = User(email="grace@example.com")
    db_session.add(user)  # not even flushed: the route's query autoflushes it
    response = await shared_client.get("/users/grace@example.com")
    assert response.status_code == OK, response.text
    assert response.json() == {"id": user.id}
    assert app.dependency_overrides


async def test_d_the_shared_session_ended_with_its_test() -> None:
    assert app.dependency_overrides == {}


async def test_e_constraints_keep_the_names_postgresql_gave(
    db_session: AsyncSession,
) -> None:
    names = await db_session.scalars(
        text(
            "SELECT conname FROM pg_constraint "
            "WHERE conrelid IN ('shop_user'::regclass, 'shop_token'::regclass)"
        )
    )
    assert sorted(names) == [
        "shop_token_pkey",
        "shop_token_user_id_fkey",
        "shop_user_email_key",
        "shop_user_pkey",
    ]


async def test_f_the_migration_left_the_loggers_on(db_session: AsyncSession) -> None:
    # Alembic's fileConfig() in env.py disables the loggers that existed then.
    names = ["shop.main", "shop.core.database", "shop.core.database.slow_units"]
    assert [name for name in names if logging.getLogger(name).disabled] == []
