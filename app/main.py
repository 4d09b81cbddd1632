"""The reference FastAPI service: lifespan wiring and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import health, items
from app.config import database_options, database_url, slow_unit_seconds, telemetry_enabled
from app.database import ReadYourWritesMiddleware, log_slow_units, session_manager
from app.errors import install_error_handlers


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if telemetry_enabled():
        from app.database import enable_telemetry  # needs the otel extra: only when asked

        enable_telemetry()
    if (slow_unit := slow_unit_seconds()) is not None:
        log_slow_units(slow_unit)
    session_manager.init(url=database_url(), **database_options())
    try:
        # A replica URL that points at a primary fails the start, not the first reads.
        await session_manager.verify_replicas()
        yield
    finally:
        await session_manager.close()


def create_app() -> FastAPI:
    app = FastAPI(title="Items", lifespan=lifespan)
    app.include_router(items.router)
    app.include_router(health.router)
    install_error_handlers(app)
    # A client's reads after its own write skip replicas that have not replayed it.
    app.add_middleware(ReadYourWritesMiddleware)
    return app


app = create_app()
