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


async def get_read_db() -> AsyncIterator[AsyncSession]:
    """Yield one read-only session per request: on a replica when one can serve it."""
    async with session_manager.session(read_only=True) as session:
        yield session


# Function-scoped like AsyncSessionDep: the connection goes back to the pool before
# the response is sent.
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_db, scope="function")]


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


# Where FastAPI (>= 0.121) keeps the exit stacks of the request's dependencies: the
# function-scoped ones (closed, and so committed, once the handler returns) and
# the request-scoped ones (closed after the response is sent).
_FUNCTION_STACK = "fastapi_function_astack"
_REQUEST_STACK = "fastapi_inner_astack"


class RetryingRoute(APIRoute):
    """A route run again whole (dependencies and handler, in a new transaction) on a conflict.

    A serialization failure or deadlock, raised by the handler or by its session's
    COMMIT, re-runs the request up to `attempts` times in all, so the client gets
    one answer. Safe only if the handler has no side effect outside the database
    except through `on_commit`, and does not call `session.commit()` itself
    (refused). Use `APIRouter(route_class=RetryingRoute)`, or
    `retrying_route_class(attempts=N)` for another count.
    """

    attempts: ClassVar[int] = DEFAULT_ATTEMPTS

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        attempts, name = self.attempts, f"{','.join(sorted(self.methods or ()))} {self.path}"

        async def attempt_in_own_stacks(request: Request) -> Response:
            # Each attempt gets exit stacks of its own, so that its dependencies end
            # with it: its function-scoped session commits (or rolls back) inside
            # the attempt, and a failed attempt's request-scoped ones are closed,
            # with its error, before the next attempt starts. A successful attempt's
            # request-scoped dependencies are handed to the request's own stack, to
            # end after the response as usual.
            scope = request.scope
            outer_request, outer_function = scope.get(_REQUEST_STACK), scope.get(_FUNCTION_STACK)
            if not isinstance(outer_request, AsyncExitStack) or outer_function is None:
                raise RuntimeError(
                    "RetryingRoute needs FastAPI >= 0.121.1 (function-scoped dependencies)"
                )
            try:
                async with AsyncExitStack() as request_stack:
                    scope[_REQUEST_STACK] = request_stack
                    async with AsyncExitStack() as function_stack:
                        scope[_FUNCTION_STACK] = function_stack
                        response = await handler(request)
                    await outer_request.enter_async_context(request_stack.pop_all())
                return response
            finally:
                scope[_REQUEST_STACK], scope[_FUNCTION_STACK] = outer_request, outer_function

        async def retrying_handler(request: Request) -> Response:
            return await run_with_retries(lambda: attempt_in_own_stacks(request), attempts, name)

        return retrying_handler


def retrying_route_class(attempts: int = DEFAULT_ATTEMPTS) -> type[RetryingRoute]:
    """A `RetryingRoute` that runs a request at most `attempts` times."""
    count = check_attempts(attempts)
    return type(f"RetryingRoute{count}", (RetryingRoute,), {"attempts": count})
