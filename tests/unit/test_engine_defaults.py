"""The defaults init() adds (pool shape, timeouts), and where the caller's values win."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import make_url
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool

from app.database import DatabaseConfigError
from app.database._config import (
    POOL_DEFAULTS,
    POOL_TIMEOUT_SECONDS,
    engine_options,
)
from app.database.drivers import COMMAND_TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS

ASYNCPG = make_url("postgresql+asyncpg://app@db.example/app")


def test_asyncpg_gets_a_connect_command_and_pool_timeout() -> None:
    """Without timeout options every wait is bounded: 5 s, 30 s, 5 s."""
    options = engine_options({}, ASYNCPG)

    assert options["connect_args"] == {
        "timeout": CONNECT_TIMEOUT_SECONDS,
        "command_timeout": COMMAND_TIMEOUT_SECONDS,
    }
    assert options["pool_timeout"] == POOL_TIMEOUT_SECONDS


def test_the_callers_connect_args_are_kept_and_win() -> None:
    """Other connect_args stay beside the defaults; an explicit None turns one off."""
    settings = {"application_name": "billing"}
    options = engine_options(
        {"connect_args": {"server_settings": settings, "command_timeout": None}}, ASYNCPG
    )

    assert options["connect_args"] == {
        "server_settings": settings,
        "command_timeout": None,
        "timeout": CONNECT_TIMEOUT_SECONDS,
    }


def test_a_timeout_in_the_url_query_is_used_as_a_number() -> None:
    """The URL's query values win over the defaults, turned into the numbers asyncpg needs."""
    url = make_url("postgresql+asyncpg://app@db.example/app?command_timeout=60&timeout=9")

    assert engine_options({}, url)["connect_args"] == {"timeout": 9.0, "command_timeout": 60.0}


def test_a_timeout_in_the_url_query_that_is_no_number_is_refused() -> None:
    """?timeout=soon would fail every connect later: refused at init(), naming the form."""
    url = make_url("postgresql+asyncpg://app:secret@db.example/app?timeout=soon")

    with pytest.raises(DatabaseConfigError, match=r"\?timeout=10") as caught:
        engine_options({}, url)
    assert "secret" not in str(caught.value)


def test_the_default_pool_is_fixed() -> None:
    """No sizes passed: 15 kept connections and no overflow, most recently used first."""
    options = engine_options({}, ASYNCPG)

    assert {name: options[name] for name in POOL_DEFAULTS} == {
        "pool_size": 15,
        "max_overflow": 0,
        "pool_timeout": POOL_TIMEOUT_SECONDS,
        "pool_use_lifo": True,
    }


@pytest.mark.parametrize(
    ("given", "shape"),
    [
        ({"pool_size": 3}, (3, 0)),
        ({"max_overflow": 10}, (15, 10)),
        ({"pool_size": 5, "max_overflow": 10}, (5, 10)),
        ({"pool_size": 2, "max_overflow": -1}, (2, -1)),
    ],
)
def test_the_sizes_passed_are_used_as_given(given: dict[str, int], shape: tuple[int, int]) -> None:
    """Only a size left out takes the default; none is rewritten into another shape."""
    options = engine_options(given, ASYNCPG)

    assert (options["pool_size"], options["max_overflow"]) == shape


@pytest.mark.parametrize(
    ("poolclass", "queue_pool"), [(AsyncAdaptedQueuePool, True), (NullPool, False)]
)
def test_pool_defaults_are_set_only_for_a_queue_pool(poolclass: Any, queue_pool: bool) -> None:
    """A pool that never queues (NullPool) would reject pool_size, pool_timeout, ..."""
    options = engine_options({"poolclass": poolclass}, ASYNCPG)

    assert [name for name in POOL_DEFAULTS if name in options] == (
        list(POOL_DEFAULTS) if queue_pool else []
    )


def test_other_drivers_get_no_driver_options() -> None:
    """aiosqlite knows none of the drivers' options; its queue pool gets the pool timeout."""
    options = engine_options({}, make_url("sqlite+aiosqlite:///demo.sqlite3"))

    assert "connect_args" not in options
    assert options["pool_timeout"] == POOL_TIMEOUT_SECONDS
