"""`GET /health`: a real database round trip plus the pool's counters.

`GET /health/migrations`: whether the database's Alembic revision is the code's
head, so that a deploy that forgot to migrate is seen. Kept apart from `/health`,
the readiness probe, which stays one cheap round trip.
"""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path
from typing import Any, Literal

from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import Connection

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


class HealthStatus(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
    pool: dict[str, Any]  # the pool's class and counters
    replicas: list[dict[str, Any]] | None = None  # replica_status(), when there are some


class HealthFailure(BaseModel):
    status: Literal["unavailable"]
    database: str  # the failure's class name only


@router.get(
    "/health",
    response_model=HealthStatus,
    responses={503: {"model": HealthFailure, "description": "No database answer in time."}},
)
async def health() -> JSONResponse:
    """200 after a database round trip, with the pool's counters (and the replicas'
    state, if any); 503 if none comes."""
    try:
        await asyncio.wait_for(_round_trip(), HEALTH_TIMEOUT_SECONDS)
    # Any failure means "unavailable": drivers differ in what they raise (under
    # SQLAlchemy 2.0 asyncpg's connect errors arrive unwrapped).
    except Exception as error:
        # The exception's class name only: its text may carry host names or SQL.
        failure = {"status": "unavailable", "database": type(error).__name__}
        return JSONResponse(failure, status_code=503)
    body: dict[str, Any] = {"status": "ok", "database": "ok", "pool": _pool_status()}
    replicas = session_manager.replica_status()
    if replicas:
        # What the background probes last saw: no round trip to any replica here. A
        # replica out of use is not unhealthy: its reads go to the primary.
        body["replicas"] = replicas
    return JSONResponse(body)


ALEMBIC_INI = Path(__file__).resolve().parent.parent / "alembic.ini"


class MigrationStatus(BaseModel):
    """The database's Alembic revisions beside the code's heads."""

    # ok: at the head. behind: at an older revision, or none (never migrated).
    # unknown revision: at one this code does not have (a newer release migrated it).
    status: Literal["ok", "behind", "unknown revision"]
    database: list[str]
    code: list[str]


class MigrationCheckFailure(BaseModel):
    status: Literal["unavailable"]
    database: str  # the failure's class name only


@cache
def _scripts() -> ScriptDirectory:
    # Read once per process (about 6 ms for this repository's migrations); the
    # scripts cannot change under a running service.
    return ScriptDirectory.from_config(Config(str(ALEMBIC_INI)))


def _known(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except CommandError:
        return False


def migration_status(connection: Connection) -> MigrationStatus:
    """Compare the revision recorded in `connection`'s database with the code's heads.

    Two queries: whether `alembic_version` exists, and its rows. For `run_sync`.
    """
    scripts = _scripts()
    code = sorted(scripts.get_heads())
    database = sorted(MigrationContext.configure(connection).get_current_heads())
    if database == code:
        status: Literal["ok", "behind", "unknown revision"] = "ok"
    elif all(_known(scripts, revision) for revision in database):
        status = "behind"
    else:
        status = "unknown revision"
    return MigrationStatus(status=status, database=database, code=code)


async def _check_migrations() -> MigrationStatus:
    async with session_manager.engine.connect() as connection:
        return await connection.run_sync(migration_status)


@router.get(
    "/health/migrations",
    response_model=MigrationStatus,
    responses={
        503: {
            "model": MigrationStatus | MigrationCheckFailure,
            "description": "The database is not at the code's head revision, or did not answer.",
        }
    },
)
async def migrations() -> JSONResponse:
    """200 if the database's Alembic revision is the code's head; 503 if it is behind
    (a deploy that did not migrate), at a revision the code does not know, or unreachable.

    Not a readiness probe: while a rolling deploy migrates first, the old release's
    instances see a revision they do not know. Costs a pooled connection and two
    small queries; the first call also reads the migration scripts.
    """
    try:
        result = await asyncio.wait_for(_check_migrations(), HEALTH_TIMEOUT_SECONDS)
    except Exception as error:
        failure = MigrationCheckFailure(status="unavailable", database=type(error).__name__)
        return JSONResponse(failure.model_dump(), status_code=503)
    return JSONResponse(result.model_dump(), status_code=200 if result.status == "ok" else 503)
