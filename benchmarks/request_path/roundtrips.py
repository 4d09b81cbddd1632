"""The round-trip pass: each variant, alone, through the counting proxy.

First sequential GETs and POSTs, for the round trips of one request; then a batch
at the highest concurrency, for what a layer pays under load (a connection opened
for a burst is one more connect and more statements to prepare). Not timed, and
never during the timed passes: the proxy's own hop would slow the variant.
"""

from __future__ import annotations

import random
from collections import Counter

from sqlalchemy.engine import URL

from .asgi import AsgiClient, Call, running
from .load import drive, plan, posts
from .proxy import RoundTripProxy
from .report import RoundTrips
from .timing import CONCURRENCIES
from .timing import WARM_UP as WARM_UP_LOADED
from .variants import Variant

HIGH = max(CONCURRENCIES)

WARM_UP = 30
"""Sequential GETs and POSTs first: connections opened, statements prepared."""
COUNTED = 50
"""Then this many GETs, and as many POSTs, counted; each sequence is one more."""


async def count_round_trips(
    variant: Variant, url: URL, loaded: int, rng: random.Random, posted: Counter[str]
) -> RoundTrips:
    """Round trips per GET and per POST through `variant`, after a warm-up; then per call
    and connections opened per 1,000 calls over a mixed batch of `loaded` calls at c=32.
    """
    proxy = RoundTripProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    try:
        app = variant.make_app(url.set(host="127.0.0.1", port=port))
        async with running(app) as client:
            warm_up = plan(variant.name, 2 * WARM_UP, rng, get_share=0.5)
            await drive(client.send, warm_up, concurrency=1)
            posted[variant.name] += posts(warm_up)
            get, get_trace, get_opened = await _count(proxy, client, plan("", COUNTED, rng, 1.0))
            calls = plan(variant.name, COUNTED, rng, get_share=0.0)
            post, post_trace, post_opened = await _count(proxy, client, calls)
            posted[variant.name] += posts(calls) + 1
            under_load, loaded_opened = await _count_loaded(
                proxy, client, variant.name, loaded, rng, posted
            )
    finally:
        await proxy.close()
    sequential_opened = 1000 * (get_opened + post_opened) / (2 * COUNTED)
    return RoundTrips(
        get, post, get_trace, post_trace, under_load, {1: sequential_opened, HIGH: loaded_opened}
    )


async def _count(
    proxy: RoundTripProxy, client: AsgiClient, calls: list[Call]
) -> tuple[float, list[str], int]:
    """Round trips per call and connections opened over `calls`; one more call's sequence."""
    proxy.reset()
    await drive(client.send, calls, concurrency=1)
    per_call, opened = proxy.round_trips / len(calls), proxy.connections
    proxy.reset(record=True)
    await drive(client.send, calls[-1:], concurrency=1)
    return per_call, proxy.trace, opened


async def _count_loaded(
    proxy: RoundTripProxy,
    client: AsgiClient,
    name: str,
    count: int,
    rng: random.Random,
    posted: Counter[str],
) -> tuple[float, float]:
    """Round trips per call, and connections opened per 1,000 calls, at concurrency HIGH."""
    for batch in (WARM_UP_LOADED, count):  # the last batch is the one counted
        calls = plan(name, batch, rng)
        proxy.reset()
        await drive(client.send, calls, HIGH)
        posted[name] += posts(calls)
    return proxy.round_trips / count, 1000 * proxy.connections / count
