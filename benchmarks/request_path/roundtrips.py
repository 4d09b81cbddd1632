"""The round-trip pass: each configuration, alone, through the counting proxy.

First sequential GETs and POSTs, for the round trips of one request; then a batch
at the highest concurrency, for what a layer pays under load (a connection opened
for a burst is one more connect and more statements to prepare). Not timed, and
never during the timed passes: the proxy's own hop would slow the variant. For
the `pgbouncer` deployment the proxy sits between the app and PgBouncer, so it
counts what the app asks for, as it does direct.
"""

from __future__ import annotations

import random
from collections import Counter

from sqlalchemy.engine import URL

from .asgi import AsgiClient, Call, running
from .load import drive, plan, posts
from .proxy import RoundTripProxy
from .report import RoundTrips
from .timing import HIGH
from .variants import Configuration

COUNTED = 50
"""Default GETs, and as many POSTs, counted one at a time, after a warm-up of as many
calls, half of each; each sequence is one more."""


async def count_round_trips(
    conf: Configuration,
    url: URL,
    *,
    counted: int,
    loaded: int,
    warm_up: int,
    rng: random.Random,
    posted: Counter[str],
) -> RoundTrips:
    """Round trips per GET and per POST through `conf`, after a warm-up, `counted` of each;
    then per call and connections opened per 1,000 calls over a mixed batch of `loaded`
    calls at c=32, after `warm_up` calls. `url` is PostgreSQL's or PgBouncer's.
    """
    proxy = RoundTripProxy(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    try:
        app = conf.make_app(url.set(host="127.0.0.1", port=port))
        async with running(app) as client:
            first = plan(conf.key, counted, rng, get_share=0.5)
            await drive(client.send, first, concurrency=1)
            posted[conf.key] += posts(first)
            get, get_trace, get_opened = await _count(proxy, client, plan("", counted, rng, 1.0))
            calls = plan(conf.key, counted, rng, get_share=0.0)
            post, post_trace, post_opened = await _count(proxy, client, calls)
            posted[conf.key] += posts(calls) + 1
            under_load, loaded_opened = await _count_loaded(
                proxy, client, conf.key, (warm_up, loaded), rng, posted
            )
    finally:
        await proxy.close()
    sequential_opened = 1000 * (get_opened + post_opened) / (2 * counted)
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
    batches: tuple[int, int],
    rng: random.Random,
    posted: Counter[str],
) -> tuple[float, float]:
    """Round trips per call, and connections opened per 1,000 calls, at concurrency HIGH,
    over the second of `batches` (a warm-up, then the batch counted)."""
    count = batches[-1]
    for batch in batches:  # the last batch is the one counted
        calls = plan(name, batch, rng)
        proxy.reset()
        await drive(client.send, calls, HIGH)
        posted[name] += posts(calls)
    return proxy.round_trips / count, 1000 * proxy.connections / count
