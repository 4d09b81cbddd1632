"""FastAPI integration: the per-request session dependency, and routes that retry conflicts.

Kept apart so that batch jobs can use the package without FastAPI installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Annotated, Any, ClassVar

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from sqlalchemy.ext.asyncio import AsyncSession

from ._manager import session_manager
from ._retry import DEFAULT_ATTEMPTS, check_attempts, run_with_retries
from ._transaction_options import transaction_options


async def get_db() -> AsyncIterator[AsyncSession]:
    """Yield one session per request; commit if the route returns, else roll back."""
    async with session_manager.session() as session:
        yield session


# scope="function" runs get_db's exit, and so the COMMIT, before the response is
# sent: a commit that fails becomes a 500 instead of a 200 for lost data.
AsyncSessionDep = Annotated[AsyncSession, Depends(get_db, scope="function")]


def session_dependency(
    *, isolation_level: str | None = None, read_only: bool = False, deferrable: bool = False
) -> Callable[[], AsyncIterator[AsyncSession]]:
    """A `get_db` whose transaction has this isolation level and these flags.

    Use it like `get_db`, function-scoped so that it commits before the response:
    `SerializableSessionDep = Annotated[AsyncSession, Depends(session_dependency(
    isolation_level="SERIALIZABLE"), scope="function")]`. A bad level is refused
    here, at import time, not at the first request.
    """
    transaction_options(isolation_level, read_only, deferrable)

    async def get_db_with_options() -> AsyncIterator[AsyncSession]:
        async with session_manager.session(
            isolation_level=isolation_level, read_only=read_only, deferrable=deferrable
        ) as session:
            yield session

    return get_db_with_options


# Where FastAPI (>= 0.121) keeps the exit stack of the request's function-scoped
# dependencies: it closes it, and so commits, after the route handler returns.
_FUNCTION_STACK = "fastapi_function_astack"


class RetryingRoute(APIRoute):
    """A route run again whole (dependencies and handler, in a new transaction) on a conflict.

    A serialization failure or deadlock, raised by the handler or by its session's
    COMMIT, re-runs the request up to `attempts` times in all, so the client gets
    one answer. Safe only if the handler has no side effect outside the database
    except through `on_commit`. Use `APIRouter(route_class=RetryingRoute)`, or
    `retrying_route_class(attempts=N)` for another count.
    """

    attempts: ClassVar[int] = DEFAULT_ATTEMPTS

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        attempts, name = self.attempts, f"{','.join(sorted(self.methods or ()))} {self.path}"

        async def attempt_in_own_stack(request: Request) -> Response:
            # Each attempt gets its own exit stack for function-scoped dependencies,
            # closed here, so that its session commits (or rolls back) inside the
            # attempt: a conflict at COMMIT can then be retried, and a failed
            # attempt's session is closed before the next one starts.
            outer = request.scope.get(_FUNCTION_STACK)
            try:
                async with AsyncExitStack() as stack:
                    request.scope[_FUNCTION_STACK] = stack
                    return await handler(request)
            finally:
                request.scope[_FUNCTION_STACK] = outer

        async def retrying_handler(request: Request) -> Response:
            if _FUNCTION_STACK not in request.scope:
                raise RuntimeError(
                    "RetryingRoute needs FastAPI >= 0.121.1 (function-scoped dependencies)"
                )
            return await run_with_retries(lambda: attempt_in_own_stack(request), attempts, name)

        return retrying_handler


def retrying_route_class(attempts: int = DEFAULT_ATTEMPTS) -> type[RetryingRoute]:
    """A `RetryingRoute` that runs a request at most `attempts` times."""
    count = check_attempts(attempts)
    return type(f"RetryingRoute{count}", (RetryingRoute,), {"attempts": count})
