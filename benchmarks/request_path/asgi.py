"""Requests straight into an ASGI app, without an HTTP client or server in between.

What a request costs is then the app's own work (routing, validation, the session
layer, the database), not an HTTP client's; every variant is called the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI


@dataclass(frozen=True)
class Call:
    """One request of a load plan, and the status that means it worked."""

    method: str
    path: str
    body: bytes = b""

    @property
    def expected_status(self) -> int:
        return 201 if self.method == "POST" else 200


Send = Callable[[Call], Awaitable[tuple[int, bytes]]]
"""Issues one call; returns the response's status and body."""


class AsgiClient:
    """Calls an app whose lifespan is running, as an ASGI server would."""

    def __init__(self, app: FastAPI, state: dict[str, Any]) -> None:
        self._app = app
        self._state = state

    async def send(self, call: Call) -> tuple[int, bytes]:
        headers = [(b"host", b"bench"), (b"content-length", str(len(call.body)).encode())]
        if call.body:
            headers.append((b"content-type", b"application/json"))
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": call.method,
            "scheme": "http",
            "path": call.path,
            "raw_path": call.path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": headers,
            "client": ("127.0.0.1", 40000),
            "server": ("bench", 80),
            # A shallow copy per request, as servers do: middlewares write into it.
            "state": dict(self._state),
        }
        status = 0
        chunks: list[bytes] = []
        body_sent = False
        response_done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            # A client that stays connected until the response is complete: an
            # early disconnect would make BaseHTTPMiddleware cancel the request.
            await response_done.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    response_done.set()

        # A task per request, as an ASGI server runs each: the request gets a copy of
        # the context, so what it sets in a context variable ends with it. Called in
        # the worker's own task, a request would inherit what the worker's previous
        # ones set: app.database's read-your-writes floor, remembered after a commit,
        # would hold the same worker's later reads to a replica that replayed it.
        await asyncio.ensure_future(self._app(scope, receive, send))
        return status, b"".join(chunks)


@asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[AsgiClient]:
    """Run `app`'s lifespan (opening its pool) around a client for it."""
    async with app.router.lifespan_context(app) as state:
        yield AsgiClient(app, dict(state or {}))
