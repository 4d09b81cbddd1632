"""Benchmarks: performance claims measured side by side in one run, reported as ratios."""
