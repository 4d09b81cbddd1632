"""What one request costs on five session layers; run with `python -m benchmarks.request_path`."""
