"""Concurrent writers over HTTP, and the oracle that checks every acknowledged write.

Each write creates an item whose name is a fresh UUID, so after the run the
table says exactly which writes happened, whatever the clients were told.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

import httpx

# Long enough never to cut a slow request short: a hang is for the no-hang tests.
REQUEST_TIMEOUT_SECONDS = 120.0
KEEPALIVE_EXPIRY_SECONDS = 1.0


@dataclass(frozen=True)
class Write:
    """One POST /items: when it was sent and answered, and how."""

    name: str
    sent: float
    received: float
    status: int | None  # None: the request failed below HTTP (reset, refused, timeout)
    transport_error: str | None = None  # its exception class, when status is None

    @property
    def acknowledged(self) -> bool:
        """Whether the client was told the write succeeded (a 2xx)."""
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True)
class Outcome:
    """The reconciliation of what clients were told against what the table holds."""

    requests: int
    acknowledged: int
    refused: int  # an HTTP error status
    transport_errors: int
    lost: int  # acknowledged, yet absent
    ambiguous: int  # not acknowledged, yet present
    phantom: int  # present, yet never sent


def reconcile(writes: list[Write], stored_names: set[str]) -> Outcome:
    """Classify every write against the names actually stored."""
    sent = {write.name for write in writes}
    return Outcome(
        requests=len(writes),
        acknowledged=sum(write.acknowledged for write in writes),
        refused=sum(write.status is not None and not write.acknowledged for write in writes),
        transport_errors=sum(write.status is None for write in writes),
        lost=sum(write.acknowledged and write.name not in stored_names for write in writes),
        ambiguous=sum(not write.acknowledged and write.name in stored_names for write in writes),
        phantom=len(stored_names - sent),
    )


async def write_until(base_url: str, clients: int, stop: asyncio.Event) -> list[Write]:
    """Run `clients` writers, each sending one write after another, until `stop` is set."""
    writes: list[Write] = []
    # Keep-alive connections expire well before uvicorn closes idle ones (5 s): at
    # equal timeouts a write sent on a connection the server is closing fails with a
    # ReadError without reaching the app, a fault of the load generator, not the service.
    limits = httpx.Limits(
        max_connections=clients,
        max_keepalive_connections=clients,
        keepalive_expiry=KEEPALIVE_EXPIRY_SECONDS,
    )
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=REQUEST_TIMEOUT_SECONDS
    ) as client:

        async def writer() -> None:
            while not stop.is_set():
                writes.append(await _write(client))

        await asyncio.gather(*(writer() for _ in range(clients)))
    return writes


async def _write(client: httpx.AsyncClient) -> Write:
    name = uuid.uuid4().hex
    sent = time.monotonic()
    try:
        response = await client.post("/items", json={"name": name})
    except httpx.TransportError as error:
        return Write(name, sent, time.monotonic(), None, type(error).__name__)
    return Write(name, sent, time.monotonic(), response.status_code)
