"""The timed rounds: every variant at every concurrency, in an order shuffled per round.

Shared by the in-process pass (apps called directly) and the real-HTTP pass
(uvicorn servers); each gives a way to send a call to each variant.
"""

from __future__ import annotations

import gc
import random
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

from sqlalchemy.engine import URL

from .asgi import Send, running
from .load import drive, plan, posts
from .report import Cell
from .variants import Variant

CONCURRENCIES = (1, 32)
WARM_UP = 200
"""Calls per variant at the highest concurrency before the first round: every
pooled connection opened and its statements prepared."""


def batch_size(requests: int, concurrency: int) -> int:
    """`requests` per batch at concurrency > 1, a quarter of it (at least 1) at 1.

    One worker issues calls one at a time, so a quarter takes about as long.
    """
    return requests if concurrency > 1 else max(1, requests // 4)


async def measure_rounds(
    senders: dict[str, Send],
    rounds: int,
    requests: int,
    rng: random.Random,
    posted: Counter[str],
    cpu_seconds: Callable[[str], float] | None = None,
) -> list[Cell]:
    """Warm up every variant, then time `rounds` rounds of every (variant, concurrency)."""
    for name, send in senders.items():
        calls = plan(name, WARM_UP, rng)
        await drive(send, calls, max(CONCURRENCIES))
        posted[name] += posts(calls)
    cells = {(name, c): Cell(name, c) for name in senders for c in CONCURRENCIES}
    order = list(cells)
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        rng.shuffle(order)
        for name, concurrency in order:
            calls = plan(name, batch_size(requests, concurrency), rng)
            # Collect now, so that the last batch's garbage is not billed to this one.
            gc.collect()
            cpu_before = cpu_seconds(name) if cpu_seconds else 0.0
            cells[name, concurrency].batches.append(await drive(senders[name], calls, concurrency))
            if cpu_seconds:
                cells[name, concurrency].cpu_seconds += cpu_seconds(name) - cpu_before
            posted[name] += posts(calls)
        print(
            f"round {number}/{rounds} in {time.perf_counter() - started:.1f} s: "
            + ", ".join(f"{name} c={concurrency}" for name, concurrency in order),
            file=sys.stderr,
        )
    return list(cells.values())


@asynccontextmanager
async def in_process(variants: Sequence[Variant], url: URL) -> AsyncIterator[dict[str, Send]]:
    """Every variant's app, its lifespan running, called directly: open side by side."""
    async with AsyncExitStack() as stack:
        senders: dict[str, Send] = {}
        for variant in variants:
            client = await stack.enter_async_context(running(variant.make_app(url)))
            senders[variant.name] = client.send
        yield senders
