"""A pytest plugin recording which lines of app/database/ each test runs, and its duration.

Why it exists: cosmic-ray runs one command per mutant and has no test selection of
its own; mutation/select_tests.py picks a mutant's tests from what this records in
the baseline run (`-p mutation.contexts`, MUTATION_COVERAGE_FILE naming the data
file). Coverage starts when pytest imports the plugin, before any conftest imports
the package, so import-time lines are recorded too (under the empty context).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from pathlib import Path

import coverage  # type: ignore[import-not-found,unused-ignore]  # .venv-mutation only
import pytest

_DATA_FILE = Path(os.environ["MUTATION_COVERAGE_FILE"])
# greenlet: SQLAlchemy's asyncio layer runs the package's sync code in greenlets; a
# tracer unaware of their switches files lines under the wrong function (lines of
# _manager.py's replica check were recorded for tests that configure no replica).
_coverage = coverage.Coverage(
    data_file=str(_DATA_FILE),
    data_suffix=True,
    source=["app/database"],
    concurrency=["greenlet", "thread"],
)
_coverage.start()
_durations: dict[str, float] = {}
_failed: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    _coverage.switch_context(item.nodeid)
    started = time.perf_counter()
    yield
    _durations[item.nodeid] = time.perf_counter() - started
    _coverage.switch_context("")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.failed:
        _failed.append(report.nodeid)


def pytest_unconfigure() -> None:
    _coverage.stop()
    _coverage.save()
    durations = _DATA_FILE.with_name(f"durations.{os.getpid()}.json")
    durations.write_text(json.dumps(_durations))
    failed = _DATA_FILE.with_name(f"failed.{os.getpid()}.json")
    failed.write_text(json.dumps(_failed))
