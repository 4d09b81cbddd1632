"""Per-test timings in, a Markdown table and the isolation overhead out."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

# Rounds of per-test durations in seconds: samples[strategy][round][test].
Samples = dict[str, list[list[float]]]


@dataclass(frozen=True)
class Summary:
    """One strategy's per-test figures, in milliseconds, over every round."""

    name: str
    tests: int
    median_ms: float
    min_ms: float
    max_ms: float


def summarize(name: str, rounds: list[list[float]]) -> Summary:
    every = [seconds * 1000 for batch in rounds for seconds in batch]
    return Summary(name, len(every), median(every), min(every), max(every))


def markdown_table(samples: Samples, reference: str) -> str:
    """One row per strategy, with its median's ratio to the `reference` strategy's."""
    summaries = [summarize(name, rounds) for name, rounds in samples.items()]
    base = next(s.median_ms for s in summaries if s.name == reference)
    lines = [
        f"| strategy | tests | median ms per test | min ms | max ms | ratio to {reference} |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {s.name} | {s.tests} | {s.median_ms:.1f} | {s.min_ms:.1f} | {s.max_ms:.1f} "
        f"| {s.median_ms / base:.2f}x |"
        for s in summaries
    ]
    return "\n".join(lines)


def overhead_line(samples: Samples, isolated: str, baseline: str) -> str:
    """`isolated` minus `baseline`, over all tests, with the spread of per-round medians."""
    total = summarize(isolated, samples[isolated]).median_ms
    total -= summarize(baseline, samples[baseline]).median_ms
    # Both ran in every round, side by side: their difference per round shows how
    # far the overall figure can be trusted.
    per_round = [
        (median(ours) - median(theirs)) * 1000
        for ours, theirs in zip(samples[isolated], samples[baseline], strict=True)
    ]
    return (
        f"isolation overhead ({isolated} minus {baseline}): {total:.2f} ms per test "
        f"(median of each); per-round medians {min(per_round):.2f} to {max(per_round):.2f} ms"
    )
