"""The load: a seeded plan of GETs and POSTs, issued by concurrent workers, each timed.

The same plan shape drives the in-process pass, the round-trip pass and the
real-HTTP pass; only the way a call is sent differs.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

from .asgi import Call, Send
from .shape import INITIAL_ROWS

GET_SHARE = 0.8
"""80 % GET /rows/{id}, 20 % POST /rows, mixed in one seeded sequence."""
GET_ONLY = 1.0
"""`--get-only`: every timed call is a GET, the scenario of a read-heavy API."""


def plan(variant: str, count: int, rng: random.Random, get_share: float = GET_SHARE) -> list[Call]:
    """`count` calls: GETs of existing rows and POSTs of rows named after `variant`."""
    calls = []
    for number in range(count):
        if rng.random() < get_share:
            calls.append(Call("GET", f"/rows/{rng.randint(1, INITIAL_ROWS)}"))
        else:
            body = json.dumps({"name": f"{variant}:{number}", "amount": number}).encode()
            calls.append(Call("POST", "/rows", body))
    return calls


def posts(calls: list[Call]) -> int:
    return sum(call.method == "POST" for call in calls)


@dataclass(frozen=True)
class Measurement:
    """One batch: its wall time and every call's latency, in seconds."""

    seconds: float
    latencies: list[float]

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.seconds


class UnexpectedResponse(RuntimeError):
    """A call answered with another status than 200 (GET) or 201 (POST)."""


async def drive(send: Send, calls: list[Call], concurrency: int) -> Measurement:
    """Issue `calls` from `concurrency` workers, each sending its next call when done."""
    latencies = [0.0] * len(calls)
    # One iterator shared by all workers: each call is taken exactly once, in order.
    numbers = iter(range(len(calls)))

    async def worker() -> None:
        for number in numbers:
            call = calls[number]
            started = time.perf_counter()
            status, body = await send(call)
            latencies[number] = time.perf_counter() - started
            if status != call.expected_status:
                raise UnexpectedResponse(
                    f"{call.method} {call.path} answered {status}: {body[:300]!r}"
                )

    workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, len(calls)))]
    started = time.perf_counter()
    try:
        await asyncio.gather(*workers)
    except BaseException:
        # Stop the other workers too, so that no request outlives the batch.
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        raise
    return Measurement(time.perf_counter() - started, latencies)
