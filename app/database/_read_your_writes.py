"""`ReadYourWritesMiddleware`: a client's reads after its own write skip stale replicas.

The position of the client's last write travels in a cookie to its next requests
(`_wal_position.py` keeps it for the request itself).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any

from ._errors import DatabaseConfigError
from ._wal_position import (
    format_position,
    new_floor,
    parse_position,
    required_position,
    reset_floor,
    seconds_to_carry,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE_NAME = "db_position"


class ReadYourWritesMiddleware:
    """Carry the WAL position of a client's last write to its next requests, in a cookie.

    A request that committed on the primary answers with the cookie; a request that
    brings it back reads only from replicas that have replayed that far (or from the
    primary). The cookie lives the committing manager's `max_replica_lag` (from
    `init()`) plus 2.5 s (`STALENESS_MARGIN_SECONDS`): by then every replica still in
    use has replayed the write; there is no second setting to keep in step. A
    position that could not be read after a commit travels as `FFFFFFFF/FFFFFFFF`:
    the primary for the cookie's life. A missing or malformed cookie is ignored (a
    forged one only sends that client's reads to the primary). Add it with
    `app.add_middleware(ReadYourWritesMiddleware)`.
    """

    def __init__(
        self, app: ASGIApp, *, cookie_name: str = COOKIE_NAME, max_replica_lag: None = None
    ) -> None:
        if max_replica_lag is not None:
            # An earlier version took it and had to be kept equal to init()'s by hand.
            raise DatabaseConfigError(
                "ReadYourWritesMiddleware no longer takes max_replica_lag: the cookie "
                "follows init(max_replica_lag=...); drop the argument"
            )
        self.app = app
        self.cookie_name = cookie_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        brought = self._position_in(scope)
        token = new_floor(brought)

        async def send_with_position(message: Message) -> None:
            # Sent after every commit, even one below the position brought (which stays
            # the value): the cookie's life then covers that write too.
            max_age = math.ceil(seconds_to_carry())
            if message["type"] == "http.response.start" and max_age > 0:
                cookie = (
                    f"{self.cookie_name}={format_position(required_position())}; "
                    f"Max-Age={max_age}; Path=/; HttpOnly; SameSite=Lax"
                )
                headers = [*message.get("headers", ()), (b"set-cookie", cookie.encode("latin-1"))]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_position)
        finally:
            reset_floor(token)

    def _position_in(self, scope: Scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"cookie":
                cookies: SimpleCookie = SimpleCookie()
                try:
                    cookies.load(value.decode("latin-1"))
                except Exception:  # a malformed Cookie header: treated as absent
                    continue
                morsel = cookies.get(self.cookie_name)
                if morsel is not None:
                    return parse_position(morsel.value) or 0
        return 0
