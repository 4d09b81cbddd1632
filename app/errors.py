"""HTTP answers for database failures: 409, 503 with Retry-After, or 504, by `classify_error`.

A body names the class of problem only, never the exception's text, which may
carry SQL, parameter values or host names.

`DATABASE_ERROR_RESPONSES` documents these answers for a router's OpenAPI entries.

A 405 names, in `Allow`, every method its path takes (`method_not_allowed`).

A `CommitOutcomeUnknownError` (the connection broke after COMMIT was sent) is a
503 without Retry-After: the write may be stored, so a blind retry could apply it twice.

A `TransactionAbortedError` (the route caught a database error and carried on, so
COMMIT was refused and nothing was written) answers as the failure it was caused
by would have: a swallowed unique violation is still a 409. Catching it was a bug,
so it is logged with the failed statement and its SQLSTATE (not the driver's
message, which can carry row values).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse
from sqlalchemy import exc
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.database import (
    CommitOutcomeUnknownError,
    DatabaseErrorKind,
    TransactionAbortedError,
    classify_error,
)
from app.schemas import ErrorBody

logger = logging.getLogger(__name__)

# Every class a classified database error can have: SQLAlchemy's, and what asyncpg
# raises unwrapped (its connect errors under SQLAlchemy 2.0, its command_timeout, a
# refused socket). The handler re-raises whatever classify_error does not
# recognise, so an OSError of any other origin still ends as a 500.
DATABASE_ERROR_TYPES: tuple[type[Exception], ...] = (
    exc.SQLAlchemyError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,  # ConnectionError, socket.gaierror, and TimeoutError
    asyncio.TimeoutError,  # a class of its own on Python 3.10
    TransactionAbortedError,  # classified by its cause, the statement that failed first
    CommitOutcomeUnknownError,  # the connection broke after COMMIT was sent
)


@dataclass(frozen=True)
class _Answer:
    status: int
    detail: str
    retry_after_seconds: int | None = None


_ANSWERS = {
    # Retrying unchanged would fail the same way until the data changes.
    DatabaseErrorKind.CONFLICT: _Answer(409, "the request conflicts with the current data"),
    # The whole transaction was rolled back, so the same request can simply be sent
    # again; the concurrent one it lost to is usually done within a second.
    DatabaseErrorKind.RETRYABLE: _Answer(
        503, "the request collided with a concurrent one and was not applied; retry it", 1
    ),
    # A restart or a failover takes seconds: retrying sooner only adds load.
    DatabaseErrorKind.UNAVAILABLE: _Answer(503, "the database is unavailable; retry later", 5),
    # Likely to take as long again: no invitation to retry.
    DatabaseErrorKind.TIMEOUT: _Answer(504, "the database did not answer in time"),
}
# The write may or may not be stored: no invitation to retry, which could apply it
# twice; the client must check, or resend with an idempotency key of its own.
_OUTCOME_UNKNOWN = _Answer(
    503, "the database connection was lost while committing: the request may have been applied"
)
# Every pooled connection was busy (PoolExhaustedError, or the pool's own error
# outside a unit of work): the burst that caused it drains within moments.
_POOL_EXHAUSTED = _Answer(503, "the service is at capacity; retry shortly", 1)


async def database_error_response(request: Request, error: Exception) -> JSONResponse:
    """The response for a classified database error; any other error is re-raised (a 500)."""
    kind = classify_error(error)
    if kind is None:
        raise error
    if isinstance(error, exc.TimeoutError):
        answer = _POOL_EXHAUSTED
    elif isinstance(error, CommitOutcomeUnknownError):
        answer = _OUTCOME_UNKNOWN
    else:
        answer = _ANSWERS[kind]
    if isinstance(error, TransactionAbortedError):
        # The route's bug, whatever the answer: name the statement that failed first
        # (its parameters hidden by hide_parameters=True) and its SQLSTATE. Not the
        # traceback: the driver's message carries row values ("Key (email)=(...)").
        # An unclassified cause was re-raised above, and the server logs it as a 500.
        first = error.__cause__
        logger.error(
            "%s %s answered %d: the route caught a database error (%s, SQLSTATE %s, in %r) "
            "and carried on, so the transaction was aborted and nothing was written",
            request.method,
            request.url.path,
            answer.status,
            kind.value,
            getattr(getattr(first, "orig", None), "sqlstate", None),
            getattr(first, "statement", None),
        )
    elif answer.status >= 500:
        # The class name only: the message may carry SQL, values or host names.
        logger.warning(
            "%s %s answered %d: database %s (%s)",
            request.method,
            request.url.path,
            answer.status,
            kind.value,
            type(error).__name__,
        )
    headers = None
    if answer.retry_after_seconds is not None:
        headers = {"Retry-After": str(answer.retry_after_seconds)}
    body = ErrorBody(detail=answer.detail)
    return JSONResponse(body.model_dump(), status_code=answer.status, headers=headers)


# The answers above, for the OpenAPI entries of routes that use the database
# (`APIRouter(responses=...)`); the statuses of a route's own come beside them.
DATABASE_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorBody,
        "description": "The database is unavailable, the service is at capacity, or the "
        "request lost to a concurrent one and was not applied: send it again after "
        "`Retry-After` seconds. Without `Retry-After`, the connection was lost while "
        "committing: the request may have been applied.",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait before sending the request again",
                "schema": {"type": "integer", "minimum": 1},
            }
        },
    },
    504: {"model": ErrorBody, "description": "The database did not answer in time."},
}


# The methods a 405's Allow can name: each is tried on the request's path.
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


async def method_not_allowed(request: Request, error: Exception) -> Response:
    """A 405 whose `Allow` names every method the request's path takes.

    Starlette's names only the methods of the first route whose path matched:
    `PUT /items/1` answered `Allow: GET` although PATCH and DELETE take that path
    too. The app's routes are asked, through the public `matches`, whether they
    would take the path with each method, whatever they are (FastAPI nests an
    included router's routes in one).
    """
    assert isinstance(error, HTTPException)
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    response = await http_exception_handler(request, error)
    response.headers["Allow"] = ", ".join(allowed)
    return response


def install_error_handlers(app: FastAPI) -> None:
    """Answer classified database errors raised by `app`'s routes and dependencies,
    and 405s with every method their path takes."""
    for error_type in DATABASE_ERROR_TYPES:
        app.add_exception_handler(error_type, database_error_response)
    app.add_exception_handler(405, method_not_allowed)
