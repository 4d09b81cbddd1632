"""The ways the cancellation driver starts and cancels a unit of work (its "styles"): directly in a
task or an anyio scope, through `get_db` over ASGI, or over uvicorn with a client that hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
from fastapi import FastAPI, HTTPException, Request, Response
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.database import AsyncSessionDep, DatabaseSessionManager, _fastapi
from tests.faults.cancel_phases import Iteration, track
from tests.faults.cancel_workload import AppError, write_pair
from tests.integration.live_server import serve

STYLES = {
    "task": "C-01 task.cancel",
    "anyio": "C-02 anyio CancelScope",
    "asgi-task": "C-01 get_db over ASGI, task.cancel",
    "asgi-anyio": "C-02 get_db over ASGI, anyio CancelScope",
    "http": "C-03 uvicorn, client disconnect",
    "http-basemw": "C-03 uvicorn+BaseHTTPMiddleware, client disconnect",
}
SERVER_DONE_SECONDS = 10.0  # how long an HTTP request may run on after its client left

# Iterations by (style, number): how a request's route finds the iteration it runs.
Registry = dict[tuple[str, int], Iteration]
Sender = Callable[[DatabaseSessionManager, Iteration], Any]


def pair_app(registry: Registry, base_middleware: bool) -> FastAPI:
    """A FastAPI app whose route writes a pair through `AsyncSessionDep` (get_db)."""
    app = FastAPI()

    @app.post("/pairs/{style}/{number}")
    async def write(style: str, number: int, db: AsyncSessionDep) -> dict[str, int]:
        # Over uvicorn this is another task than the client's: follow it here too.
        iteration = registry[(style, number)]
        track(iteration, "checkout")
        try:
            await write_pair(db, iteration)
        except AppError:
            raise HTTPException(409, "refused after writing") from None
        return {"number": number}

    if base_middleware:

        async def passthrough(request: Request, call_next: RequestResponseEndpoint) -> Response:
            return await call_next(request)

        app.add_middleware(BaseHTTPMiddleware, dispatch=passthrough)
    # Added last, so outside the BaseHTTPMiddleware (only Starlette's error layer is
    # further out, and it lets a cancellation through).
    app.add_middleware(_ServerSide, registry=registry)
    return app


_STATUS_OUTCOMES = {200: "completed", 409: "failed"}


class _ServerSide:
    """ASGI layer around the routes: records how the handling of each pair request ended."""

    def __init__(self, app: ASGIApp, registry: Registry) -> None:
        self._app = app
        self._registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        parts = str(scope.get("path", "")).split("/")
        iteration = self._registry.get((parts[2], int(parts[3]))) if len(parts) == 4 else None
        if iteration is None:
            await self._app(scope, receive, send)
            return
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, sending)
        except asyncio.CancelledError:
            iteration.outcome = "cancelled"
            raise
        except BaseException as error:
            iteration.outcome = f"error: {error!r}"
            raise
        else:
            iteration.outcome = _STATUS_OUTCOMES.get(status, f"error: status {status}")
        finally:
            iteration.server_done.set()


@contextlib.contextmanager
def serving(manager: DatabaseSessionManager) -> Iterator[None]:
    """Make get_db (so AsyncSessionDep) use `manager` instead of the global session_manager."""
    # The run's manager has its own pool and application_name; the real get_db is
    # otherwise unchanged. Swapped in the namespace where get_db looks the name up.
    namespace = _fastapi.get_db.__globals__
    previous = namespace["session_manager"]
    namespace["session_manager"] = manager
    try:
        yield
    finally:
        namespace["session_manager"] = previous


def _outcome_of(task: asyncio.Task[Any]) -> str:
    if task.cancelled():
        return "cancelled"
    error = task.exception()
    if error is None:
        return "completed"
    if isinstance(error, AppError):
        return "failed"
    return f"error: {error!r}"


async def _run_task_style(iteration: Iteration, work: Callable[[], Any]) -> None:
    task: asyncio.Task[Any] = asyncio.create_task(work())
    iteration.cancel = task.cancel
    await asyncio.wait([task])
    iteration.outcome = _outcome_of(task)


async def _run_anyio_style(iteration: Iteration, work: Callable[[], Any]) -> None:
    async def scoped() -> bool:
        # Level-triggered, as in Starlette's task groups: once cancelled, every await
        # inside the scope is cancelled again until the scope exits.
        with anyio.CancelScope() as scope:
            iteration.cancel = scope.cancel
            await work()
        return scope.cancelled_caught

    task: asyncio.Task[bool] = asyncio.create_task(scoped())
    await asyncio.wait([task])
    outcome = _outcome_of(task)
    iteration.outcome = "cancelled" if outcome == "completed" and task.result() else outcome


async def _direct_unit(manager: DatabaseSessionManager, iteration: Iteration) -> None:
    track(iteration, "checkout")
    async with manager.session() as session:
        await write_pair(session, iteration)


async def _asgi_request(client: httpx.AsyncClient, iteration: Iteration) -> None:
    track(iteration, "request")
    response = await client.post(f"/pairs/{iteration.style}/{iteration.number}")
    if response.status_code == 409:
        raise AppError("refused after writing")
    response.raise_for_status()


async def _http_request(base_url: str, iteration: Iteration) -> None:
    """Send the request over a raw socket, and reset the connection when fired."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    sock = writer.get_extra_info("socket")

    def disconnect() -> None:
        if writer.transport.is_closing():
            return  # the response came first
        # SO_LINGER 0: close with a RST, as a client whose process died would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        iteration.client_gone = True

    iteration.cancel = disconnect
    iteration.enter("request")
    path = f"/pairs/{iteration.style}/{iteration.number}"
    writer.write(f"POST {path} HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n".encode())
    with contextlib.suppress(ConnectionError):
        await reader.read(1)  # the response's first byte, or EOF once disconnected
    if not writer.transport.is_closing():
        writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    # The server's side of the request may still be running: wait for its end.
    try:
        await asyncio.wait_for(iteration.server_done.wait(), SERVER_DONE_SECONDS)
    except asyncio.TimeoutError:
        iteration.outcome = f"error: the server still runs the request {SERVER_DONE_SECONDS} s on"


@contextlib.asynccontextmanager
async def front_end(style: str, registry: Registry) -> AsyncIterator[Sender]:
    """How one iteration is started and cancelled in `style`."""
    if style in ("task", "anyio"):
        run = _run_task_style if style == "task" else _run_anyio_style

        async def direct(manager: DatabaseSessionManager, iteration: Iteration) -> None:
            await run(iteration, lambda: _direct_unit(manager, iteration))

        yield direct
    elif style in ("asgi-task", "asgi-anyio"):
        run = _run_task_style if style == "asgi-task" else _run_anyio_style
        transport = httpx.ASGITransport(app=pair_app(registry, base_middleware=False))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

            async def asgi(_: DatabaseSessionManager, iteration: Iteration) -> None:
                await run(iteration, lambda: _asgi_request(client, iteration))

            yield asgi
    elif style in ("http", "http-basemw"):
        async with serve(pair_app(registry, base_middleware=style == "http-basemw")) as base:

            async def http(_: DatabaseSessionManager, iteration: Iteration) -> None:
                await _http_request(base, iteration)

            yield http
    else:
        raise ValueError(f"unknown style {style!r}: one of {', '.join(STYLES)}")
