"""A TCP proxy in front of PostgreSQL that counts the round trips its clients make.

A round trip is one client message that makes the server answer what came before
it and that the client waits for before it goes on: a Sync ('S'), which closes each
extended-protocol exchange (a bind and execute, or libpq's parse, bind and
execute) and is answered with ReadyForQuery; a Flush ('H') after extended-protocol
messages, which is how asyncpg prepares a statement (Parse, Describe, Flush: it
waits for the description before it binds); or a simple Query ('Q': BEGIN,
COMMIT, ROLLBACK, the ping `;`, asyncpg's reset). Every byte is forwarded
unchanged; only the client's messages are parsed, to count and name them.

Proxies that share a `Tally` count as one: a primary's and its replica's, for an
app that reads from the replica. The statements app.database sends about replicas
are named for what they are (`PACKAGE_STATEMENTS`), so that its background probes
can be told from a request's round trips.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Startup-phase requests that ask for encryption; answered 'N' here, so that the
# conversation stays plain text this proxy can read.
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CHUNK = 65536
# (a fragment of the statement's text, its label): app.database's statements about
# replicas (app/database/_replicas.py), first match wins. The probe reads both
# pg_is_in_recovery() and the replay position, so it comes first.
PACKAGE_STATEMENTS = (
    ("pg_is_in_recovery", "replica probe"),
    ("pg_current_wal_insert_lsn", "WAL position"),
    ("pg_last_wal_replay_lsn", "replay position"),
)
REPLICA_PROBE = "replica probe"
WAL_POSITION = "WAL position"


@dataclass
class Tally:
    """What the proxies sharing it counted since the last reset."""

    round_trips: int = 0
    connections: int = 0
    trace: list[str] = field(default_factory=list)
    by_label: Counter[str] = field(default_factory=Counter)
    recording: bool = False
    replica_probes: int = 0  # executed since the tally was made: reset() keeps it

    def reset(self, record: bool = False) -> None:
        """Zero the counts; with `record`, name each round trip in `trace` from now on."""
        self.round_trips = self.connections = 0
        self.trace = []
        self.by_label = Counter()
        self.recording = record


class RoundTripProxy:
    """Listens on 127.0.0.1 (port from `start()`), forwards to PostgreSQL, counts.

    `name`, if given, prefixes this proxy's labels in the trace (`replica:SELECT`);
    `tally` is shared with other proxies, or this proxy's own.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, name: str = "", tally: Tally | None = None
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._prefix = f"{name}:" if name else ""
        self.tally = Tally() if tally is None else tally

    @property
    def round_trips(self) -> int:
        return self.tally.round_trips

    @property
    def connections(self) -> int:
        return self.tally.connections

    @property
    def trace(self) -> list[str]:
        return self.tally.trace

    async def start(self) -> int:
        """Start listening; return the port to connect to."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def reset(self, record: bool = False) -> None:
        """Zero the counters (the shared tally's); with `record`, name each round trip in
        `trace` from now on."""
        self.tally.reset(record)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._handlers:
            # The clients have closed their pools by now: let each handler see its
            # hang-up and finish; cut only a connection still open after that.
            _, still_open = await asyncio.wait(set(self._handlers), timeout=5)
            for handler in still_open:
                handler.cancel()
            await asyncio.gather(*still_open, return_exceptions=True)

    def _count(self, label: str) -> None:
        tally = self.tally
        tally.round_trips += 1
        # By what was run: an asyncpg prepare of a statement counts with the statement.
        tally.by_label[label.removeprefix("prepare ")] += 1
        tally.replica_probes += label == REPLICA_PROBE
        if tally.recording:
            tally.trace.append(self._prefix + label)

    async def _serve(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        handler = asyncio.current_task()
        if handler is not None:  # always: start_server runs each connection in a task
            self._handlers.add(handler)
        self.tally.connections += 1
        server_out: asyncio.StreamWriter | None = None
        try:
            server_in, server_out = await asyncio.open_connection(*self._upstream)
            await self._startup(client_in, client_out, server_out)
            pipes = [
                asyncio.ensure_future(self._client_to_server(client_in, server_out)),
                asyncio.ensure_future(_pipe(server_in, client_out)),
            ]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass  # a side hung up mid-message: the other side sees the close
        except asyncio.CancelledError:
            # Cut by close(); re-raised, Python 3.11's start_server would log it as
            # an error, and nothing awaits this task but close(), which cut it.
            pass
        finally:
            for writer in (client_out, server_out):
                if writer is not None:
                    writer.close()
            if handler is not None:
                self._handlers.discard(handler)

    async def _startup(
        self,
        client_in: asyncio.StreamReader,
        client_out: asyncio.StreamWriter,
        server_out: asyncio.StreamWriter,
    ) -> None:
        # Startup-phase messages have no type byte: a length, then a request code.
        while True:
            header = await client_in.readexactly(4)
            body = await client_in.readexactly(int.from_bytes(header, "big") - 4)
            if int.from_bytes(body[:4], "big") in (SSL_REQUEST, GSSENC_REQUEST):
                client_out.write(b"N")
                await client_out.drain()
                continue
            server_out.write(header + body)  # the StartupMessage (or a CancelRequest)
            await server_out.drain()
            return

    async def _client_to_server(
        self, client_in: asyncio.StreamReader, server_out: asyncio.StreamWriter
    ) -> None:
        messages = _MessageReader(self._count)
        while data := await client_in.read(CHUNK):
            server_out.write(data)  # forwarded at once; parsing never delays a byte
            messages.feed(data)
            await server_out.drain()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    while data := await source.read(CHUNK):
        sink.write(data)
        await sink.drain()
    with contextlib.suppress(OSError):
        sink.write_eof()


class _MessageReader:
    """Splits one connection's client stream into messages and reports each round trip."""

    def __init__(self, count: Callable[[str], None]) -> None:
        self._count = count
        self._buffer = bytearray()
        self._statements: dict[bytes, str] = {}  # prepared statement name -> its verb
        self._pending = ""  # what the next Sync or Flush completes, for the trace

    def feed(self, data: bytes) -> None:
        self._buffer += data
        # After startup every message is a type byte, then a length that counts itself.
        while len(self._buffer) >= 5:
            end = 1 + int.from_bytes(self._buffer[1:5], "big")
            if len(self._buffer) < end:
                return
            kind, payload = chr(self._buffer[0]), bytes(self._buffer[5:end])
            del self._buffer[:end]
            self._handle(kind, payload)

    def _handle(self, kind: str, payload: bytes) -> None:
        if kind == "P":  # Parse: statement name, query, ...
            name, query, _ = payload.split(b"\0", 2)
            self._statements[name] = _label(query)
            self._pending = f"prepare {self._statements[name]}"
        elif kind == "B":  # Bind: portal name, statement name, ...
            _, name, _ = payload.split(b"\0", 2)
            self._pending = self._statements.get(name, "execute")
        elif kind == "C" and not self._pending:  # Close of a prepared statement or portal
            self._pending = "close"
        elif kind == "S":
            self._count(self._pending or "sync")
            self._pending = ""
        elif kind == "H" and self._pending:
            # Flush: the server sends what the messages since the last round trip
            # produced (ParseComplete, the statement's description), and asyncpg
            # waits for it. A Flush with nothing before it asks for nothing.
            self._count(self._pending)
            self._pending = ""
        elif kind == "Q":
            # psycopg sends a statement without parameters as a simple query.
            query = payload.rstrip(b"\0")
            self._count(_package_label(query) or _shortened(query))


def _label(query: bytes) -> str:
    """A prepared statement's label: what it is for app.database's own, else its first word."""
    return _package_label(query) or _first_word(query)


def _package_label(query: bytes) -> str | None:
    for fragment, label in PACKAGE_STATEMENTS:
        if fragment.encode() in query:
            return label
    return None


def _first_word(query: bytes) -> str:
    words = query.decode(errors="replace").split(maxsplit=1)
    return words[0].upper() if words else ";"


def _shortened(query: bytes, limit: int = 40) -> str:
    text = " ".join(query.decode(errors="replace").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
