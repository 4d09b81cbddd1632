"""`GET /health`: a real database round trip plus the pool's counters."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.database import session_manager

router = APIRouter(tags=["health"])

# A health probe must answer even when the database hangs.
HEALTH_TIMEOUT_SECONDS = 3.0


def _pool_status() -> dict[str, Any]:
    pool = session_manager.engine.pool
    counters = ("size", "checkedin", "checkedout", "overflow")
    # Not every pool class keeps these counters (NullPool, StaticPool do not).
    status = {name: getattr(pool, name)() for name in counters if hasattr(pool, name)}
    return {"class": type(pool).__name__, **status}


async def _round_trip() -> None:
    async with session_manager.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))


@router.get("/health")
async def health() -> JSONResponse:
    """200 after a database round trip, with the pool's counters; 503 if none comes."""
    try:
        await asyncio.wait_for(_round_trip(), HEALTH_TIMEOUT_SECONDS)
    # Any failure means "unavailable": drivers differ in what they raise (under
    # SQLAlchemy 2.0 asyncpg's connect errors arrive unwrapped).
    except Exception as error:
        # The exception's class name only: its text may carry host names or SQL.
        body = {"status": "unavailable", "database": type(error).__name__}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "database": "ok", "pool": _pool_status()})
