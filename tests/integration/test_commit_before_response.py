"""Over a real HTTP server: a 2xx is sent only after COMMIT succeeded.

These tests commit for real (no rollback fixture), because what they check only
happens at COMMIT. Each uses tables it creates and drops itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import asyncpg
import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import AsyncSessionDep, DatabaseSessionManager, get_db
from tests.integration.live_server import serve

# The COMMIT of an orphan child fails: its foreign key is only checked at COMMIT.
# A row in slow_commit makes COMMIT take SLOW_COMMIT_SECONDS, to widen the window
# between "route returned" and "COMMIT finished" where ordering bugs hide.
SLOW_COMMIT_SECONDS = 0.3
SCHEMA = f"""
CREATE TABLE timing_parent (id int PRIMARY KEY);
CREATE TABLE timing_child (
    id int PRIMARY KEY,
    parent_id int NOT NULL REFERENCES timing_parent (id) DEFERRABLE INITIALLY DEFERRED
);
CREATE TABLE timing_slow (id int PRIMARY KEY);
CREATE FUNCTION timing_sleep() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN PERFORM pg_sleep({SLOW_COMMIT_SECONDS}); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER timing_slow_commit AFTER INSERT ON timing_slow
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION timing_sleep();
"""
DROP = """
DROP TABLE IF EXISTS timing_child, timing_parent, timing_slow;
DROP FUNCTION IF EXISTS timing_sleep();
"""

# The seed's original alias: FastAPI's default scope runs the commit after the response.
RequestScopedSession = Annotated[AsyncSession, Depends(get_db)]


def _timing_app() -> FastAPI:
    app = FastAPI()

    @app.post("/orphans/{child_id}", status_code=201)
    async def add_orphan(db: AsyncSessionDep, child_id: int) -> dict[str, int]:
        await db.execute(text("INSERT INTO timing_child VALUES (:id, -1)"), {"id": child_id})
        return {"id": child_id}

    @app.post("/request-scoped/orphans/{child_id}", status_code=201)
    async def add_orphan_request_scoped(db: RequestScopedSession, child_id: int) -> dict[str, int]:
        await db.execute(text("INSERT INTO timing_child VALUES (:id, -1)"), {"id": child_id})
        return {"id": child_id}

    @app.post("/slow/{row_id}", status_code=201)
    async def add_slow(db: AsyncSessionDep, row_id: int) -> dict[str, int]:
        await db.execute(text("INSERT INTO timing_slow VALUES (:id)"), {"id": row_id})
        return {"id": row_id}

    @app.post("/refused/{row_id}")
    async def write_then_refuse(db: AsyncSessionDep, row_id: int) -> None:
        await db.execute(text("INSERT INTO timing_slow VALUES (:id)"), {"id": row_id})
        raise HTTPException(400, "refused after writing")

    return app


@pytest.fixture(name="base_url")
async def base_url_fixture(
    committed_db: DatabaseSessionManager, observer: asyncpg.Connection
) -> AsyncIterator[str]:
    """A live server for the timing app, on tables created for this test."""
    await observer.execute(DROP + SCHEMA)
    try:
        async with serve(_timing_app()) as base_url:
            yield base_url
    finally:
        await observer.execute(DROP)


async def test_failed_commit_is_answered_with_500(
    base_url: str, observer: asyncpg.Connection
) -> None:
    """A COMMIT that fails (deferred foreign key) yields a 5xx and stores nothing."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/orphans/1")

    assert response.status_code == 500
    assert await observer.fetchval("SELECT count(*) FROM timing_child") == 0


async def test_default_scope_would_answer_200_for_a_failed_commit(
    base_url: str, observer: asyncpg.Connection
) -> None:
    """Control: with FastAPI's default dependency scope the same failure returns 201."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/request-scoped/orphans/1")

    assert response.status_code == 201
    assert await observer.fetchval("SELECT count(*) FROM timing_child") == 0


async def test_row_is_committed_when_the_2xx_arrives(
    base_url: str, observer: asyncpg.Connection
) -> None:
    """Even with a slow COMMIT, a separate connection sees the row as soon as the 2xx lands."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/slow/7")

        assert response.status_code == 201
        assert await observer.fetchval("SELECT count(*) FROM timing_slow WHERE id = 7") == 1


async def test_http_exception_in_route_rolls_back(
    base_url: str, observer: asyncpg.Connection
) -> None:
    """A route that writes and then raises HTTPException leaves nothing behind."""
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.post("/refused/8")

    assert response.status_code == 400
    assert await observer.fetchval("SELECT count(*) FROM timing_slow") == 0
