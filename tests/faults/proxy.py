"""A TCP proxy between the app and PostgreSQL that injects network faults on command.

It runs its own event loop in a thread, so it keeps forwarding (or keeps not
forwarding) while the test's loop is busy, and its control methods are plain
blocking calls usable from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

T = TypeVar("T")

# The drivers end a transaction with a simple-protocol query: message type 'Q', int32
# length (4 + text + NUL), the text: "COMMIT;" from asyncpg, "COMMIT" from psycopg.
COMMIT_MESSAGES = (b"Q\x00\x00\x00\x0cCOMMIT;\x00", b"Q\x00\x00\x00\x0bCOMMIT\x00")
CHUNK = 65536
CommitFault = Literal["drop", "ack_lost"]


def _has_commit(data: bytes) -> bool:
    return any(message in data for message in COMMIT_MESSAGES)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, as a router reset or a dead host looks to the peer."""
    if writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed by the peer's reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    cut_on_reply: bool = False  # an ack_lost COMMIT was forwarded: drop the answer

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)


@dataclass
class CommitFaults:
    """What the proxy did to COMMITs so far."""

    seen: int = 0
    dropped: int = 0
    acks_lost: int = 0


@dataclass
class _Settings:
    commit_fault: CommitFault | None = None
    commit_probability: float = 0.0
    random: random.Random = field(default_factory=random.Random)
    refuse: bool = False
    accept_then_stall: bool = False


class FaultProxy:
    """Forward 127.0.0.1:`port` to `upstream_port`; faults are switched on by method calls."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.commits = CommitFaults()
        self._settings = _Settings()
        self._pairs: set[_Pair] = set()
        self._held: set[asyncio.StreamWriter] = set()  # accept_then_stall sockets
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._flowing = asyncio.Event()
        self._server: asyncio.Server | None = None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start)
        return self

    def __exit__(self, *_: object) -> None:
        self._call(self._stop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, function: Callable[[], Awaitable[T]]) -> T:
        async def run() -> T:
            return await function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)

    # --- control, from any thread -------------------------------------------------

    def stall(self) -> None:
        """Stop forwarding in both directions; sockets stay open, nothing is closed."""
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def restore(self) -> None:
        """Forward again, and accept and connect normally."""
        self._settings.refuse = False
        self._settings.accept_then_stall = False
        self._loop.call_soon_threadsafe(self._flowing.set)

    def cut(self) -> int:
        """Reset every open connection (RST to both sides); returns how many."""

        async def cut_all() -> int:
            pairs = list(self._pairs)
            for pair in pairs:
                pair.reset()
            return len(pairs)

        return self._call(cut_all)

    def refuse(self) -> None:
        """Close each new connection as soon as it is accepted, as a dead port does."""
        self._settings.refuse = True

    def accept_then_stall(self) -> None:
        """Accept new connections but never connect them upstream (a hung server)."""
        self._settings.accept_then_stall = True

    def on_commit(self, fault: CommitFault | None, probability: float = 1.0, seed: int = 0) -> None:
        """Break a `probability` share of COMMITs: "drop" before forwarding, "ack_lost" after."""
        self._settings.random = random.Random(seed)
        self._settings.commit_probability = probability
        self._settings.commit_fault = fault

    def open_connections(self) -> int:
        """Client connections currently being forwarded."""
        return len(self._pairs)

    # --- the loop's side ------------------------------------------------------------

    async def _start(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._flowing.set()  # release pumps a stall left waiting, so they can end
        self._server.close()
        for pair in list(self._pairs):
            pair.reset()
        for writer in list(self._held):
            _reset(writer)
        await self._server.wait_closed()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._settings.refuse:
            _reset(writer)
            return
        if self._settings.accept_then_stall:
            self._held.add(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(writer)
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, pair, to_server=True),
                self._pump(up_reader, writer, pair, to_server=False),
            )
        finally:
            self._pairs.discard(pair)
            pair.client.close()
            pair.upstream.close()

    async def _pump(
        self,
        source: asyncio.StreamReader,
        target: asyncio.StreamWriter,
        pair: _Pair,
        *,
        to_server: bool,
    ) -> None:
        try:
            while data := await source.read(CHUNK):
                await self._flowing.wait()
                if pair.cut_on_reply and not to_server:
                    self.commits.acks_lost += 1
                    pair.reset()  # the server committed; its answer never arrives
                    return
                if to_server and _has_commit(data) and self._commit_fault(pair):
                    return
                target.write(data)
                await target.drain()
        except (ConnectionError, OSError):
            pair.reset()  # one side broke: break the other, as a real connection would
            return
        # One side said goodbye: pass the goodbye on.
        pair.client.close()
        pair.upstream.close()

    def _commit_fault(self, pair: _Pair) -> bool:
        """Apply the COMMIT fault, if any; True when the COMMIT must not be forwarded."""
        self.commits.seen += 1
        settings = self._settings
        if settings.commit_fault is None:
            return False
        if settings.random.random() >= settings.commit_probability:
            return False
        if settings.commit_fault == "drop":
            self.commits.dropped += 1
            pair.reset()
            return True
        pair.cut_on_reply = True
        return False
