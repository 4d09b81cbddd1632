"""The reference FastAPI service: lifespan wiring and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import health, items
from app.config import database_options, database_url
from app.database import session_manager
from app.errors import install_error_handlers


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    session_manager.init(url=database_url(), **database_options())
    try:
        yield
    finally:
        await session_manager.close()


def create_app() -> FastAPI:
    app = FastAPI(title="Items", lifespan=lifespan)
    app.include_router(items.router)
    app.include_router(health.router)
    install_error_handlers(app)
    return app


app = create_app()
