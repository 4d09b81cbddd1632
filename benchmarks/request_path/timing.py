"""The timed rounds: every configuration at every concurrency, in an order shuffled per round.

Shared by the in-process pass (apps called directly) and the real-HTTP pass
(uvicorn servers); each gives a way to open a configuration and send it calls.
A configuration is open only for its turn in a round: with 20 of them, keeping
every pool open side by side would hold 300 connections, three times what a
default PostgreSQL allows (`max_connections` 100).
"""

from __future__ import annotations

import gc
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from .asgi import Send, running
from .load import GET_SHARE, drive, plan, posts
from .report import Cell
from .variants import Configuration, Servers

CONCURRENCIES = (1, 32)
HIGH = max(CONCURRENCIES)
WARM_UP = 200
"""Default calls per configuration at the highest concurrency each time it is opened,
before anything is timed or counted: every pooled connection opened and its
statements prepared."""


@dataclass(frozen=True)
class Endpoint:
    """An open configuration: how to send it a call, and the CPU time its app used so far."""

    send: Send
    cpu_seconds: Callable[[], float] | None = None


Opener = Callable[[Configuration], AbstractAsyncContextManager[Endpoint]]
"""Opens a configuration (its app's lifespan, or its server) for as long as the block."""


def batch_size(requests: int, concurrency: int) -> int:
    """`requests` per batch at concurrency > 1, a quarter of it (at least 1) at 1.

    One worker issues calls one at a time, so a quarter takes about as long.
    """
    return requests if concurrency > 1 else max(1, requests // 4)


async def measure_rounds(
    configurations: Sequence[Configuration],
    open_endpoint: Opener,
    *,
    rounds: int,
    requests: int,
    warm_up: int,
    rng: random.Random,
    posted: Counter[str],
    get_share: float = GET_SHARE,
) -> list[Cell]:
    """Time `rounds` rounds; in each, every configuration in a shuffled order is opened,
    warmed up, timed at every concurrency (in a shuffled order) and closed. `get_share`
    of the calls are GETs, warm-up included."""
    cells = {(conf, c): Cell(conf, c) for conf in configurations for c in CONCURRENCIES}
    order = list(configurations)
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        rng.shuffle(order)
        for conf in order:
            async with open_endpoint(conf) as endpoint:
                calls = plan(conf.key, warm_up, rng, get_share)
                await drive(endpoint.send, calls, HIGH)
                posted[conf.key] += posts(calls)
                concurrencies = list(CONCURRENCIES)
                rng.shuffle(concurrencies)
                for concurrency in concurrencies:
                    calls = plan(conf.key, batch_size(requests, concurrency), rng, get_share)
                    # Collect now, so that the last batch's garbage is not billed to this one.
                    gc.collect()
                    cpu_before = endpoint.cpu_seconds() if endpoint.cpu_seconds else 0.0
                    batch = await drive(endpoint.send, calls, concurrency)
                    cells[conf, concurrency].batches.append(batch)
                    if endpoint.cpu_seconds:
                        cells[conf, concurrency].cpu_seconds += endpoint.cpu_seconds() - cpu_before
                    posted[conf.key] += posts(calls)
        print(
            f"round {number}/{rounds} in {time.perf_counter() - started:.1f} s: "
            + ", ".join(conf.label for conf in order),
            file=sys.stderr,
            flush=True,
        )
    return list(cells.values())


def in_process(servers_for: Callable[[Configuration], Servers]) -> Opener:
    """Open a configuration's app, its lifespan running, to be called directly."""

    @asynccontextmanager
    async def open_endpoint(conf: Configuration) -> AsyncIterator[Endpoint]:
        async with running(conf.make_app(servers_for(conf))) as client:
            # This process's CPU: the app, its driver and the load generator, which is
            # the same for every configuration; PostgreSQL and PgBouncer are not in it.
            yield Endpoint(client.send, time.process_time)

    return open_endpoint
