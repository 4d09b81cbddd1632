"""How a benchmark ends when it cannot run: a message and an exit code, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from app.database.testing import DatabaseSetupError


@contextmanager
def clean_exits(benchmark: str, url_variable: str, default_url: str) -> Iterator[None]:
    """Turn a missing server into exit 2 and Ctrl-C into exit 130, each with one line."""
    try:
        yield
    except DatabaseSetupError as error:
        print(
            f"{benchmark}: {error}.\nPoint {url_variable} at a PostgreSQL server "
            f"where this user may create databases (default {default_url}).",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        # The databases the run created were dropped on the way out.
        print(f"{benchmark}: interrupted, nothing measured", file=sys.stderr)
        raise SystemExit(130) from None
