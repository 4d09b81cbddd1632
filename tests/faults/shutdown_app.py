"""A service with one slow write, wired like the reference service, for the SIGTERM tests.

`POST /slow/{name}?seconds=s` inserts an item, then keeps its transaction open
in `pg_sleep(s)` before the commit: a request that is cut off must leave no row.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy import text

from app.config import database_url
from app.database import AsyncSessionDep, session_manager
from tests.drivers import application_name

# Room for every request the tests send at once, so all of them reach the server
# (none waits in the pool queue) before the test sends SIGTERM.
POOL_SIZE = 20


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The reference service's lifespan, plus a name the tests find its backends by.
    session_manager.init(
        url=database_url(),
        pool_size=POOL_SIZE,
        max_overflow=0,
        connect_args=application_name(os.environ["SHUTDOWN_APP_NAME"]),
    )
    try:
        yield
    finally:
        await session_manager.close()


app = FastAPI(lifespan=lifespan)


@app.post("/slow/{name}", status_code=201)
async def insert_then_sleep(db: AsyncSessionDep, name: str, seconds: float) -> dict[str, str]:
    """Insert an item named `name`, then sleep `seconds` inside the same transaction."""
    await db.execute(text("INSERT INTO items (name) VALUES (:name)"), {"name": name})
    await db.execute(text("SELECT pg_sleep(:seconds)"), {"seconds": seconds})
    return {"name": name}
