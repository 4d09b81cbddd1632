"""The round-trip pass: each configuration, alone, through the counting proxy.

First sequential GETs and POSTs, for the round trips of one request; then a batch
at the highest concurrency, for what a layer pays under load (a connection opened
for a burst is one more connect and more statements to prepare). Not timed, and
never during the timed passes: the proxy's own hop would slow the variant. For
the `pgbouncer` deployment the proxy sits between the app and PgBouncer, so it
counts what the app asks for, as it does direct. For the `replica` deployment a
second proxy in front of the replica shares the count, so a request is counted
wherever its statements run; app.database's background probes (every 0.5 s, off
the request path) are counted apart.
"""

from __future__ import annotations

import random
import time
from collections import Counter

from sqlalchemy.engine import URL

from .asgi import AsgiClient, Call, running
from .load import GET_SHARE, drive, plan, posts
from .proxy import REPLICA_PROBE, WAL_POSITION, RoundTripProxy, Tally
from .report import RoundTrips
from .timing import HIGH
from .variants import Configuration, Servers

COUNTED = 50
"""Default GETs, and as many POSTs, counted one at a time, after a warm-up of as many
of each; each sequence is one more."""
REPLICA = "replica"
"""The replica's proxy's prefix in a trace: `replica:SELECT` ran on the replica."""


async def count_round_trips(
    conf: Configuration,
    servers: Servers,
    *,
    counted: int,
    loaded: int,
    warm_up: int,
    rng: random.Random,
    posted: Counter[str],
    get_share: float = GET_SHARE,
) -> RoundTrips:
    """Round trips per GET and per POST through `conf`, after a warm-up, `counted` of each;
    then per call and connections opened per 1,000 calls over a batch of `loaded` calls
    at c=32 (`get_share` of them GETs), after `warm_up` calls. `servers` are PostgreSQL's
    or PgBouncer's, and the replicas'.
    """
    tally = Tally()
    started = time.perf_counter()
    proxies = [_proxy(servers.url, "", tally)]
    proxies += [_proxy(url, REPLICA, tally) for url in servers.replica_urls]
    try:
        ports = [await proxy.start() for proxy in proxies]
        proxied = Servers(
            servers.url.set(host="127.0.0.1", port=ports[0]),
            tuple(
                url.set(host="127.0.0.1", port=port)
                for url, port in zip(servers.replica_urls, ports[1:], strict=True)
            ),
        )
        async with running(conf.make_app(proxied)) as client:
            first = _warm_up(conf.key, counted, rng)
            await drive(client.send, first, concurrency=1)
            posted[conf.key] += posts(first)
            get, get_trace, get_opened = await _count(tally, client, plan("", counted, rng, 1.0))
            calls = plan(conf.key, counted, rng, get_share=0.0)
            post, post_trace, post_opened = await _count(tally, client, calls)
            posted[conf.key] += posts(calls) + 1
            under_load, loaded_opened = await _count_loaded(
                tally, client, conf.key, (warm_up, loaded), rng, posted, get_share
            )
    finally:
        for proxy in proxies:
            await proxy.close()
    # Every probe comes with a sample of the primary's WAL position (_background).
    probes_per_second = 2 * tally.replica_probes / (time.perf_counter() - started)
    sequential_opened = 1000 * (get_opened + post_opened) / (2 * counted)
    return RoundTrips(
        get,
        post,
        get_trace,
        post_trace,
        under_load,
        {1: sequential_opened, HIGH: loaded_opened},
        probes_per_second,
    )


def _warm_up(variant: str, count: int, rng: random.Random) -> list[Call]:
    """`count` GETs and `count` POSTs in a random order. Both kinds, whatever the draw:
    a warm-up without a GET would leave the replica's first connection, and its
    connect-time round trips, to the counted GETs (a 5-call warm-up drew no GET once)."""
    calls = plan("", count, rng, get_share=1.0) + plan(variant, count, rng, get_share=0.0)
    rng.shuffle(calls)
    return calls


def _proxy(url: URL, name: str, tally: Tally) -> RoundTripProxy:
    return RoundTripProxy(url.host or "127.0.0.1", url.port or 5432, name=name, tally=tally)


def _background(tally: Tally) -> int:
    """The round trips of app.database's replica probes among those counted.

    Each probe cycle samples the primary's WAL position, then probes the replica (the
    deployment has one), so each probe comes with at most one WAL-position read. A
    request's own WAL-position read (after a commit, with replicas configured) is
    the same statement: only the probes' number tells the two apart. A cycle whose
    probe fails leaves its sample in the requests' count.
    """
    probes = tally.by_label[REPLICA_PROBE]
    return probes + min(probes, tally.by_label[WAL_POSITION])


def _requests_trace(trace: list[str]) -> list[str]:
    """`trace` without a probe cycle that ran meanwhile: the probe, and the primary's
    WAL-position sample before it."""
    kept: list[str] = []
    for label in trace:
        if label.endswith(REPLICA_PROBE):
            samples = [i for i, seen in enumerate(kept) if seen.endswith(WAL_POSITION)]
            if samples and not kept[samples[-1]].startswith(f"{REPLICA}:"):
                del kept[samples[-1]]
            continue
        kept.append(label)
    return kept


async def _count(
    tally: Tally, client: AsgiClient, calls: list[Call]
) -> tuple[float, list[str], int]:
    """Round trips per call and connections opened over `calls`; one more call's sequence."""
    tally.reset()
    await drive(client.send, calls, concurrency=1)
    per_call = (tally.round_trips - _background(tally)) / len(calls)
    opened = tally.connections
    tally.reset(record=True)
    await drive(client.send, calls[-1:], concurrency=1)
    return per_call, _requests_trace(tally.trace), opened


async def _count_loaded(
    tally: Tally,
    client: AsgiClient,
    name: str,
    batches: tuple[int, int],
    rng: random.Random,
    posted: Counter[str],
    get_share: float,
) -> tuple[float, float]:
    """Round trips per call, and connections opened per 1,000 calls, at concurrency HIGH,
    over the second of `batches` (a warm-up, then the batch counted)."""
    count = batches[-1]
    for batch in batches:  # the last batch is the one counted
        calls = plan(name, batch, rng, get_share)
        tally.reset()
        await drive(client.send, calls, HIGH)
        posted[name] += posts(calls)
    return (tally.round_trips - _background(tally)) / count, 1000 * tally.connections / count
