"""init() refuses options that are unknown or contradict each other, before any engine
exists, naming the fix and never the password."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool, StaticPool

import app.database._engine
from app.database import DatabaseConfigError, DatabaseSessionManager
from tests.faults.canary import assert_no_canary, exception_channels
from tests.faults.server import CANARY_PASSWORD as CANARY

ASYNCPG = URL.create("postgresql+asyncpg", username="app", password=CANARY, host="db")
PSYCOPG = ASYNCPG.set(drivername="postgresql+psycopg")
MEMORY = "sqlite+aiosqlite:///:memory:"


def _never_connects() -> Any:
    raise AssertionError("a refused option's pool must not connect")


REFUSED = [
    (
        ASYNCPG,
        {"poolclass": NullPool, "max_overflow": 5},
        "max_overflow= applies to a queue pool, but this engine's pool is NullPool, which "
        "opens a connection for each checkout and keeps none: remove max_overflow= or poolclass=",
    ),
    (
        ASYNCPG,
        {"poolclass": NullPool, "pool_size": 5},
        "pool_size= applies to a queue pool, but this engine's pool is NullPool",
    ),
    (ASYNCPG, {"poolclass": NullPool, "pool_timeout": 2}, "pool_timeout= applies to a queue pool"),
    (ASYNCPG, {"poolclass": NullPool, "pool_use_lifo": True}, "pool_use_lifo= applies"),
    (
        ASYNCPG,
        {"poolclass": StaticPool, "pool_size": 1},
        "pool_size= applies to a queue pool, but this engine's pool is StaticPool",
    ),
    # SQLAlchemy's own choice for an in-memory database: nothing to remove but the option.
    (MEMORY, {"pool_size": 3}, "this engine's pool is StaticPool, which holds one connection"),
    (MEMORY, {"pool_timeout": 3}, "database of its own): remove pool_timeout="),
    (ASYNCPG, {"pool_recyle": 60}, "unknown option pool_recyle= for init()"),
    (ASYNCPG, {"pool_recyle": 60}, "did you mean pool_recycle=?"),
    (ASYNCPG, {"replica_url": "x"}, "did you mean replica_urls=?"),
    (PSYCOPG, {"max_replica_lags": 1}, "did you mean max_replica_lag=?"),
    (ASYNCPG, {"statement_timeout": 5}, "unknown option statement_timeout= for init()"),
    (ASYNCPG, {"pool": NullPool(_never_connects)}, "pass poolclass= and the pool's options"),
    (ASYNCPG, {"poolclass": QueuePool}, "use sqlalchemy.pool.AsyncAdaptedQueuePool"),
    (ASYNCPG, {"poolclass": NullPool(_never_connects)}, "got an instance of NullPool"),
    (ASYNCPG, {"poolclass": "NullPool"}, "poolclass must be a pool class"),
    (ASYNCPG, {"isolation_level": "AUTOCOMMIT"}, "use session(read_only=True)"),
    (PSYCOPG, {"isolation_level": "SERIALISABLE"}, "isolation_level must be one of"),
]


@pytest.mark.parametrize(("url", "options", "message"), REFUSED)
def test_refused_before_any_engine_exists(
    url: str | URL,
    options: dict[str, Any],
    message: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each refusal names the fix; no engine is built, and the password shows nowhere."""

    def no_engine(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an engine was built before the options were checked")

    monkeypatch.setattr(app.database._engine, "create_async_engine", no_engine)
    caplog.set_level(logging.DEBUG)
    manager = DatabaseSessionManager()

    with pytest.raises(DatabaseConfigError) as caught:
        manager.init(url=url, **options)

    assert message in str(caught.value)
    assert repr(manager) == "<DatabaseSessionManager new>"
    assert_no_canary(
        {**exception_channels(caught.value), "repr(manager)": repr(manager), "logs": caplog.text}
    )


def test_an_unknown_options_value_is_never_echoed() -> None:
    """A misspelt option may carry a secret (passwrod=...): only its name is shown."""
    with pytest.raises(
        DatabaseConfigError, match=r"unknown option passwrod= for init\(\)"
    ) as caught:
        DatabaseSessionManager().init(url=ASYNCPG, passwrod=CANARY)

    assert_no_canary(exception_channels(caught.value))


@pytest.mark.parametrize(
    ("url", "options"),
    [
        (ASYNCPG, {"poolclass": NullPool, "pool_recycle": 60, "pool_pre_ping": True}),
        (ASYNCPG, {"poolclass": AsyncAdaptedQueuePool, "pool_size": 2, "max_overflow": -1}),
        (MEMORY, {"pool_recycle": 60}),
        ("sqlite+aiosqlite:///demo.sqlite3", {"pool_size": 2, "pool_timeout": 1}),
        (PSYCOPG, {"client_encoding": "utf8", "isolation_level": "repeatable_read"}),
        (
            ASYNCPG,
            {
                "echo": True,
                "echo_pool": "debug",
                "execution_options": {"logging_token": "x"},
                "query_cache_size": 100,
                "pool_reset_on_return": "rollback",
                "logging_name": "app",
                "json_serializer": str,
            },
        ),
    ],
    ids=["nullpool", "unbounded-overflow", "memory", "sqlite-file", "psycopg", "engine-options"],
)
async def test_options_the_pool_and_dialect_take_are_accepted(
    url: str | URL, options: dict[str, Any]
) -> None:
    """Whatever create_async_engine() takes for this dialect and pool class passes."""
    manager = DatabaseSessionManager()
    manager.init(url=url, **options)
    await manager.close()
