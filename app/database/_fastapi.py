"""FastAPI integration: the per-request session dependency.

Kept apart so that batch jobs can use the package without FastAPI installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.ext.asyncio import AsyncSession

from ._manager import session_manager


async def get_db() -> AsyncIterator[AsyncSession]:
    """Yield one session per request; commit if the route returns, else roll back."""
    async with session_manager.session() as session:
        yield session


# scope="function" runs get_db's exit, and so the COMMIT, before the response is
# sent: a commit that fails becomes a 500 instead of a 200 for lost data.
AsyncSessionDep = Annotated[AsyncSession, Depends(get_db, scope="function")]
