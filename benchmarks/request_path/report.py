"""Measurements in, Markdown tables out: throughput, its ratios, latency, round trips.

Rows come in blocks of one deployment, one driver and one concurrency, so the
variants compared side by side sit together. Ratios between two configurations
are taken round by round (both were timed in the same round) and summarised as
the median with the lowest and highest round.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import median

from .load import Measurement
from .variants import (
    DEPLOYMENTS,
    DRIVERS,
    OURS,
    OURS_OTEL,
    OURS_READ,
    POOLED,
    REFERENCE,
    REPLICATED,
    SERVER_STACKS,
    VARIANTS,
    Configuration,
)

TARGET_OVER_PEERS = 1.3
"""Through PgBouncer at the highest concurrency, ours at least this times every peer."""
TARGET_DRIVER_GAP = 0.15
"""Ours on psycopg within this share of ours on asyncpg, both direct."""
# Issue 10's targets for a GET through ReadSessionDep (ours_read), GET-only load.
TARGET_GET_ROUND_TRIPS = 1
GET_ROUND_TRIPS_SLACK = 0.05
"""An average may exceed the target by this much: a one-off round trip in the counted
calls (a connection's session default switched to read-only once, a statement
prepared on its sixth use on psycopg) is not a second round trip per GET."""
TARGET_READ_OVER_RAW = 0.65
"""At c=1, ours_read at least this times raw asyncpg's throughput."""
TARGET_READ_OVER_PEERS = 1.3
"""At every concurrency, ours_read at least this times every peer."""
OTHERS = tuple(v.name for v in VARIANTS if v.name not in (REFERENCE, OURS, OURS_READ, OURS_OTEL))
"""The other SQLAlchemy layers: the seed pattern and the peers."""


@dataclass
class Cell:
    """Every batch of one configuration at one concurrency, over all rounds, in order."""

    configuration: Configuration
    concurrency: int
    batches: list[Measurement] = field(default_factory=list)
    cpu_seconds: float = 0.0  # the app's CPU over all batches: this process, or its server

    @property
    def rps(self) -> list[float]:
        return [batch.requests_per_second for batch in self.batches]

    @property
    def latencies_ms(self) -> list[float]:
        return sorted(s * 1000 for batch in self.batches for s in batch.latencies)

    @property
    def requests(self) -> int:
        return sum(len(batch.latencies) for batch in self.batches)


@dataclass(frozen=True)
class RoundTrips:
    """Round trips per request through the proxy, and one request's sequence of them."""

    get: float
    post: float
    get_trace: list[str]
    post_trace: list[str]
    loaded: float  # per request of a batch of the run's load at the highest concurrency
    new_connections: dict[int, float]  # per 1,000 requests, by concurrency
    # app.database's replica probes, off the request path (0 without replicas).
    probes_per_second: float = 0.0


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest value with `share` of all at or below it."""
    return sorted_values[max(0, math.ceil(share * len(sorted_values)) - 1)]


SLOW_MS = 200.0
"""A request slower than this counts in the "slow" column: a pool waiter starving."""


def _order(cell: Cell) -> tuple[int, int, int, int, int]:
    conf = cell.configuration
    variant = next(i for i, v in enumerate(VARIANTS) if v.name == conf.variant.name)
    servers = ("", *SERVER_STACKS)
    return (
        DEPLOYMENTS.index(conf.deployment),
        DRIVERS.index(conf.driver),
        cell.concurrency,
        variant,
        servers.index(conf.server),
    )


def ordered(cells: Iterable[Cell]) -> list[Cell]:
    """Blocks of deployment, driver and concurrency; the variants in VARIANTS' order."""
    return sorted(cells, key=_order)


def _find(
    cells: list[Cell],
    variant: str,
    driver: str,
    deployment: str,
    concurrency: int,
    server: str = "",
) -> Cell | None:
    """The cell of that configuration (under uvicorn's `server` stack: `--http`)."""
    for cell in cells:
        conf = cell.configuration
        if (conf.variant.name, conf.driver, conf.deployment, cell.concurrency, conf.server) == (
            variant,
            driver,
            deployment,
            concurrency,
            server,
        ):
            return cell
    return None


def _reference(cells: list[Cell], cell: Cell, reference: str) -> Cell | None:
    conf = cell.configuration
    return _find(cells, reference, conf.driver, conf.deployment, cell.concurrency, conf.server)


def _ratio_to(cells: list[Cell], cell: Cell, reference: str) -> str:
    base = _reference(cells, cell, reference)
    return f"{median(cell.rps) / median(base.rps):.2f}x" if base else "-"


def _rps(cell: Cell) -> str:
    rps = cell.rps
    return f"{median(rps):.0f} ({min(rps):.0f}-{max(rps):.0f})"


def timing_table(
    cells: list[Cell], reference: str, round_trips: dict[Configuration, RoundTrips] | None
) -> str:
    """One row per configuration and concurrency; `round_trips` adds their columns."""
    header = "| via | driver | c | variant | requests/s median (min-max) | ratio to raw | p50 ms"
    header += " | p99 ms | max ms | slow > 200 ms | CPU ms per request |"
    rule = "|---|---|--:|---|--:|--:|--:|--:|--:|--:|--:|"
    if round_trips is not None:
        header += " round trips GET / POST | new connections per 1000 |"
        rule += "--:|--:|"
    lines = [header, rule]
    for cell in ordered(cells):
        conf, latencies = cell.configuration, cell.latencies_ms
        line = (
            f"| {conf.deployment} | {conf.driver} | {cell.concurrency} | {conf.variant.name} "
            f"| {_rps(cell)} | {_ratio_to(cells, cell, reference)} "
            f"| {percentile(latencies, 0.5):.1f} | {percentile(latencies, 0.99):.1f} "
            f"| {max(latencies):.0f} | {sum(ms > SLOW_MS for ms in latencies)} "
            f"| {cell.cpu_seconds * 1000 / cell.requests:.2f} |"
        )
        if round_trips is not None:
            counts = round_trips.get(conf)
            opened = counts.new_connections.get(cell.concurrency) if counts else None
            line += f" {_number(counts.get)} / {_number(counts.post)} |" if counts else " - |"
            line += " - |" if opened is None else f" {opened:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def http_table(cells: list[Cell], reference: str) -> str:
    """The real-HTTP pass: throughput, latency and the server's CPU per request, per
    uvicorn stack (the ratio to raw is to raw on the same stack)."""
    lines = [
        "| via | driver | c | variant | uvicorn | requests/s median (min-max) | ratio to raw"
        " | p50 ms | p99 ms | server CPU ms per request |",
        "|---|---|--:|---|---|--:|--:|--:|--:|--:|",
    ]
    for cell in ordered(cells):
        conf, latencies = cell.configuration, cell.latencies_ms
        lines.append(
            f"| {conf.deployment} | {conf.driver} | {cell.concurrency} | {conf.variant.name} "
            f"| {conf.server} | {_rps(cell)} | {_ratio_to(cells, cell, reference)} "
            f"| {percentile(latencies, 0.5):.1f} | {percentile(latencies, 0.99):.1f} "
            f"| {cell.cpu_seconds * 1000 / cell.requests:.2f} |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Ratio:
    """One configuration's throughput over another's, round by round."""

    per_round: list[float]

    @property
    def median(self) -> float:
        return median(self.per_round)

    def __str__(self) -> str:
        values = self.per_round
        return f"{median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def ratio(numerator: Cell | None, denominator: Cell | None) -> Ratio | None:
    """`numerator`'s requests/s over `denominator`'s, in each round both ran."""
    if numerator is None or denominator is None:
        return None
    pairs = zip(numerator.rps, denominator.rps, strict=True)
    return Ratio([a / b for a, b in pairs])


def _present(cells: list[Cell], attribute: str, order: tuple[str, ...]) -> list[str]:
    seen = {getattr(cell.configuration, attribute) for cell in cells}
    return [name for name in order if name in seen]


def over_others(cells: list[Cell], subject: str = OURS) -> str:
    """`subject` (ours or ours_read) over every other SQLAlchemy layer, per deployment,
    driver and concurrency."""
    names = [n for n in OTHERS if any(c.configuration.variant.name == n for c in cells)]
    if not names or not any(c.configuration.variant.name == subject for c in cells):
        return ""
    lines = [
        "| via | driver | c | " + " | ".join(f"{subject} / {name}" for name in names) + " |",
        "|---|---|--:|" + "--:|" * len(names),
    ]
    for deployment in _present(cells, "deployment", DEPLOYMENTS):
        for driver in _present(cells, "driver", DRIVERS):
            for c in sorted({cell.concurrency for cell in cells}):
                ours = _find(cells, subject, driver, deployment, c)
                if ours is None:
                    continue
                found = [ratio(ours, _find(cells, n, driver, deployment, c)) for n in names]
                lines.append(
                    f"| {deployment} | {driver} | {c} | "
                    + " | ".join("-" if r is None else str(r) for r in found)
                    + " |"
                )
    return "\n".join(lines)


def _cpu_ms(cell: Cell) -> str:
    return f"{cell.cpu_seconds * 1000 / cell.requests:.2f}"


def instrumentation(cells: list[Cell]) -> str:
    """ours_otel over ours (telemetry on over off), round by round, with the CPU per
    request of each, per deployment, driver, concurrency (and uvicorn stack)."""
    lines = [
        "| via | driver | c | uvicorn | ours_otel / ours, requests/s | CPU ms per request, "
        "ours / ours_otel |",
        "|---|---|--:|---|--:|--:|",
    ]
    for cell in ordered(cells):
        conf = cell.configuration
        if conf.variant.name != OURS:
            continue
        on = _find(cells, OURS_OTEL, conf.driver, conf.deployment, cell.concurrency, conf.server)
        found = ratio(on, cell)
        if on is None or found is None:
            continue
        lines.append(
            f"| {conf.deployment} | {conf.driver} | {cell.concurrency} | {conf.server or '-'} "
            f"| {found} | {_cpu_ms(cell)} / {_cpu_ms(on)} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def server_stacks(cells: list[Cell]) -> str:
    """The `--http` pass: uvloop+httptools over asyncio+h11, per configuration, round by
    round, with the server's CPU per request on each."""
    plain, fast = SERVER_STACKS
    lines = [
        f"| via | driver | c | variant | {fast} / {plain}, requests/s | server CPU ms per "
        f"request, {plain} / {fast} |",
        "|---|---|--:|---|--:|--:|",
    ]
    for cell in ordered(cells):
        conf = cell.configuration
        if conf.server != plain:
            continue
        other = _find(
            cells, conf.variant.name, conf.driver, conf.deployment, cell.concurrency, fast
        )
        found = ratio(other, cell)
        if other is None or found is None:
            continue
        lines.append(
            f"| {conf.deployment} | {conf.driver} | {cell.concurrency} | {conf.variant.name} "
            f"| {found} | {_cpu_ms(cell)} / {_cpu_ms(other)} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def across(cells: list[Cell]) -> str:
    """Per variant: psycopg over asyncpg, and through PgBouncer over direct, round by round.

    A gap every variant shares is the driver's or the pooler's; one only ours shows
    is the package's.
    """
    columns: list[tuple[str, tuple[str, str], tuple[str, str]]] = [
        (f"psycopg / asyncpg, {d}", ("psycopg", d), ("asyncpg", d)) for d in DEPLOYMENTS
    ]
    columns.append(
        (f"psycopg {POOLED} / asyncpg direct", ("psycopg", POOLED), ("asyncpg", "direct"))
    )
    columns += [
        (f"{POOLED} / direct, {driver}", (driver, POOLED), (driver, "direct")) for driver in DRIVERS
    ]
    concurrencies = sorted({cell.concurrency for cell in cells})
    rows: list[tuple[str, int, list[Ratio | None]]] = []
    for variant in _present(cells, "variant_name", tuple(v.name for v in VARIANTS)):
        for c in concurrencies:
            found = [
                ratio(_find(cells, variant, *top, c), _find(cells, variant, *bottom, c))
                for _, top, bottom in columns
            ]
            rows.append((variant, c, found))
    return _ratio_table("variant", [header for header, _, _ in columns], rows)


def _ratio_table(
    label: str, headers: list[str], rows: list[tuple[str, int, list[Ratio | None]]]
) -> str:
    """Ratios per (`label`, c), without the columns that have none; "" if none has any."""
    kept = [i for i in range(len(headers)) if any(found[i] for _, _, found in rows)]
    if not kept:
        return ""
    lines = [
        f"| {label} | c | " + " | ".join(headers[i] for i in kept) + " |",
        "|---|--:|" + "--:|" * len(kept),
    ]
    for name, c, found in rows:
        texts = ["-" if found[i] is None else str(found[i]) for i in kept]
        lines.append(f"| {name} | {c} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def targets(cells: list[Cell], peers: list[str], high: int) -> list[str]:
    """The two targets the benchmark is held to, each met or missed, where measured."""
    lines = []
    for driver in _present(cells, "driver", DRIVERS):
        ours = _find(cells, OURS, driver, POOLED, high)
        found = {p: ratio(ours, _find(cells, p, driver, POOLED, high)) for p in peers}
        measured = {p: r for p, r in found.items() if r is not None}
        if measured:
            verdict = all(r.median >= TARGET_OVER_PEERS for r in measured.values())
            lines.append(
                f"- through PgBouncer on {driver} at c={high}, ours >= "
                f"{TARGET_OVER_PEERS:g}x every peer: {'met' if verdict else 'MISSED'} ("
                + ", ".join(f"{p} {r.median:.2f}x" for p, r in measured.items())
                + ")"
            )
    for c in sorted({cell.concurrency for cell in cells}):
        found_ratio = ratio(
            _find(cells, OURS, "psycopg", "direct", c), _find(cells, OURS, "asyncpg", "direct", c)
        )
        if found_ratio is not None:
            verdict = found_ratio.median >= 1 - TARGET_DRIVER_GAP
            lines.append(
                f"- ours on psycopg within {TARGET_DRIVER_GAP:.0%} of ours on asyncpg, direct, "
                f"c={c}: {'met' if verdict else 'MISSED'} ({found_ratio.median:.2f}x)"
            )
    return lines


# (column, (variant, deployment) over (variant, deployment)): what routing a unit of
# work costs, or saves. The last is no routing at all: the replica deployment's
# private primary against the shared server, the same raw pool on each.
ROUTING_COLUMNS = (
    ("ReadSessionDep / AsyncSessionDep, direct", (OURS_READ, "direct"), (OURS, "direct")),
    (
        "ReadSessionDep on the replica / AsyncSessionDep with the replica configured",
        (OURS_READ, REPLICATED),
        (OURS, REPLICATED),
    ),
    (
        "AsyncSessionDep, replica configured / none",
        (OURS, REPLICATED),
        (OURS, "direct"),
    ),
    (
        "ReadSessionDep, on the replica / direct",
        (OURS_READ, REPLICATED),
        (OURS_READ, "direct"),
    ),
    ("raw, replica / direct (the servers)", (REFERENCE, REPLICATED), (REFERENCE, "direct")),
)
ROUTED = ((OURS, "direct"), (OURS_READ, "direct"), (OURS, REPLICATED), (OURS_READ, REPLICATED))


def routing(cells: list[Cell], round_trips: dict[Configuration, RoundTrips]) -> str:
    """What choosing a session dependency, and configuring a replica, costs per request:
    throughput ratios round by round, then per driver the round trips and the time per
    request at c=1 of each of ours' four ways."""
    concurrencies = sorted({cell.concurrency for cell in cells})
    rows = []
    for driver in _present(cells, "driver", DRIVERS):
        for c in concurrencies:
            found = [
                ratio(
                    _find(cells, top[0], driver, top[1], c),
                    _find(cells, bottom[0], driver, bottom[1], c),
                )
                for _, top, bottom in ROUTING_COLUMNS
            ]
            rows.append((driver, c, found))
    table = _ratio_table("driver", [header for header, _, _ in ROUTING_COLUMNS], rows)
    if not table:
        return ""
    lines = [table, ""]
    for driver in _present(cells, "driver", DRIVERS):
        parts = []
        for variant, deployment in ROUTED:
            counts = _counts(round_trips, variant, driver, deployment)
            low = _find(cells, variant, driver, deployment, min(concurrencies))
            if counts is None or low is None:
                continue
            parts.append(
                f"{variant} {deployment}: {1000 / median(low.rps):.2f} ms, round trips "
                f"{_number(counts.get)} / {_number(counts.post)}"
            )
        probes = [
            found.probes_per_second
            for conf, found in round_trips.items()
            if conf.driver == driver and found.probes_per_second
        ]
        if parts:
            lines.append(
                f"- {driver}, per request at c={min(concurrencies)} (1 / median requests/s) "
                "and round trips GET / POST: " + "; ".join(parts)
            )
        if probes:
            lines.append(
                f"- {driver}, with a replica configured: app.database's probes (the primary's "
                f"WAL position, the replica's state) took {median(probes):.1f} round trips "
                "per second per app, off the request path"
            )
    return "\n".join(lines)


def _counts(
    round_trips: dict[Configuration, RoundTrips], variant: str, driver: str, deployment: str
) -> RoundTrips | None:
    for conf, counts in round_trips.items():
        if (conf.variant.name, conf.driver, conf.deployment) == (variant, driver, deployment):
            return counts
    return None


def read_targets(
    cells: list[Cell], round_trips: dict[Configuration, RoundTrips], peers: list[str]
) -> list[str]:
    """Issue 10's targets for ours_read's GET, per deployment and driver, where measured."""
    lines = []
    concurrencies = sorted({cell.concurrency for cell in cells})
    for deployment in _present(cells, "deployment", DEPLOYMENTS):
        for driver in _present(cells, "driver", DRIVERS):
            counts = _counts(round_trips, OURS_READ, driver, deployment)
            if counts is None:
                continue
            sequence = len(counts.get_trace)
            most = TARGET_GET_ROUND_TRIPS + GET_ROUND_TRIPS_SLACK
            met = sequence <= TARGET_GET_ROUND_TRIPS and max(counts.get, counts.loaded) <= most
            lines.append(
                f"- {OURS_READ} {driver} {deployment}, {TARGET_GET_ROUND_TRIPS} round trip per "
                f"GET: {'met' if met else 'MISSED'} (one GET: {sequence}; "
                f"{_number(counts.get)} per sequential GET; {counts.loaded:.2f} per request "
                "under load)"
            )
            low = min(concurrencies)
            over_raw = ratio(
                _find(cells, OURS_READ, driver, deployment, low),
                _find(cells, REFERENCE, "asyncpg", deployment, low),
            )
            if over_raw is not None:
                verdict = over_raw.median >= TARGET_READ_OVER_RAW
                lines.append(
                    f"- {OURS_READ} {driver} {deployment}, c={low}, >= "
                    f"{TARGET_READ_OVER_RAW:g}x raw asyncpg: {'met' if verdict else 'MISSED'} "
                    f"({over_raw})"
                )
            for c in concurrencies:
                ours = _find(cells, OURS_READ, driver, deployment, c)
                found = {p: ratio(ours, _find(cells, p, driver, deployment, c)) for p in peers}
                measured = {p: r for p, r in found.items() if r is not None}
                if measured:
                    verdict = all(r.median >= TARGET_READ_OVER_PEERS for r in measured.values())
                    lines.append(
                        f"- {OURS_READ} {driver} {deployment}, c={c}, >= "
                        f"{TARGET_READ_OVER_PEERS:g}x every peer: "
                        f"{'met' if verdict else 'MISSED'} ("
                        + ", ".join(f"{p} {r}" for p, r in measured.items())
                        + ")"
                    )
    return lines


def trace_lines(round_trips: dict[Configuration, RoundTrips], high: int) -> str:
    """Per configuration: the round trips of one GET and one POST, and the average under load."""
    return "\n".join(
        f"- {conf.label}: GET {_sequence(counts.get_trace)}; POST "
        f"{_sequence(counts.post_trace)}; at c={high}: {counts.loaded:.2f} per request"
        for conf, counts in round_trips.items()
    )


def _sequence(trace: list[str]) -> str:
    return " > ".join(f"`{label}`" for label in trace) or "(none)"


def _number(value: float) -> str:
    return f"{value:.0f}" if value == round(value) else f"{value:.2f}"
