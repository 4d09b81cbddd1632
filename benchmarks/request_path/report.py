"""Measurements in, Markdown tables out: throughput, its ratio to `raw`, latency, round trips."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import median

from .load import Measurement


@dataclass
class Cell:
    """Every batch of one variant at one concurrency, over all rounds."""

    variant: str
    concurrency: int
    batches: list[Measurement] = field(default_factory=list)
    cpu_seconds: float = 0.0  # server CPU over all batches (real-HTTP pass only)

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
    loaded: float  # per request of a mixed batch at the highest concurrency
    new_connections: dict[int, float]  # per 1,000 requests, by concurrency


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest value with `share` of all at or below it."""
    return sorted_values[max(0, math.ceil(share * len(sorted_values)) - 1)]


SLOW_MS = 200.0
"""A request slower than this counts in the "slow" column: a pool waiter starving."""


def timing_table(
    cells: list[Cell], reference: str, round_trips: dict[str, RoundTrips] | None
) -> str:
    """One row per variant and concurrency; `round_trips` adds their column."""
    base = {c.concurrency: median(c.rps) for c in cells if c.variant == reference}
    header = "| variant | c | requests/s median (min-max) | ratio to raw | p50 ms | p99 ms"
    header += " | max ms | slow > 200 ms |"
    rule = "|---|--:|--:|--:|--:|--:|--:|--:|"
    if round_trips is not None:
        header += " round trips GET / POST | new connections per 1000 |"
        rule += "--:|--:|"
    lines = [header, rule]
    for cell in cells:
        rps, latencies = cell.rps, cell.latencies_ms
        ratio = f"{median(rps) / base[cell.concurrency]:.2f}x" if cell.concurrency in base else "-"
        line = (
            f"| {cell.variant} | {cell.concurrency} | {median(rps):.0f} ({min(rps):.0f}-"
            f"{max(rps):.0f}) | {ratio} | {percentile(latencies, 0.5):.1f} "
            f"| {percentile(latencies, 0.99):.1f} | {max(latencies):.0f} "
            f"| {sum(ms > SLOW_MS for ms in latencies)} |"
        )
        if round_trips is not None:
            counts = round_trips.get(cell.variant)
            opened = counts.new_connections.get(cell.concurrency) if counts else None
            line += f" {_number(counts.get)} / {_number(counts.post)} |" if counts else " - |"
            line += " - |" if opened is None else f" {opened:.0f} |"
        lines.append(line)
    return "\n".join(lines)


def http_table(cells: list[Cell], reference: str) -> str:
    """The real-HTTP pass: throughput, latency and the server's CPU per request."""
    base = {c.concurrency: median(c.rps) for c in cells if c.variant == reference}
    lines = [
        "| variant | c | requests/s median (min-max) | ratio to raw | p50 ms | p99 ms"
        " | server CPU ms per request |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in cells:
        rps, latencies = cell.rps, cell.latencies_ms
        ratio = f"{median(rps) / base[cell.concurrency]:.2f}x" if cell.concurrency in base else "-"
        lines.append(
            f"| {cell.variant} | {cell.concurrency} | {median(rps):.0f} ({min(rps):.0f}-"
            f"{max(rps):.0f}) | {ratio} | {percentile(latencies, 0.5):.1f} "
            f"| {percentile(latencies, 0.99):.1f} "
            f"| {cell.cpu_seconds * 1000 / cell.requests:.2f} |"
        )
    return "\n".join(lines)


def trace_lines(round_trips: dict[str, RoundTrips], high: int) -> str:
    """Per variant: the round trips of one GET and one POST, and the average under load."""
    return "\n".join(
        f"- {name}: GET {_sequence(counts.get_trace)}; POST {_sequence(counts.post_trace)}; "
        f"at c={high}: {counts.loaded:.2f} per request"
        for name, counts in round_trips.items()
    )


def _sequence(trace: list[str]) -> str:
    return " > ".join(f"`{label}`" for label in trace) or "(none)"


def _number(value: float) -> str:
    return f"{value:.0f}" if value == round(value) else f"{value:.2f}"
