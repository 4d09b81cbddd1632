"""What each test isolation strategy costs per test; run with `python -m benchmarks.isolation`."""
