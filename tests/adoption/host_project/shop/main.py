"""The service: a module-level app whose routes use the package's session."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from sqlalchemy import select

from shop import settings
from shop.core.database import AsyncSessionDep, session_manager
from shop.models import User


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    session_manager.init(url=settings.database_url())
    try:
        yield
    finally:
        await session_manager.close()


app = FastAPI(lifespan=lifespan)
logger = logging.getLogger(__name__)


@app.post("/users", status_code=201)
async def create_user(db: AsyncSessionDep, email: str) -> dict[str, int]:
    user = User(email=email)
    db.add(user)
    await db.flush()
    return {"id": user.id}


@app.get("/users/{email}")
async def read_user(db: AsyncSessionDep, email: str) -> dict[str, int]:
    user = await db.scalar(select(User).where(User.email == email))
    if user is None:
        logger.info("no user %s", email)
        raise HTTPException(status_code=404, detail="no such user")
    return {"id": user.id}
