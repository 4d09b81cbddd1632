"""What `init()` refuses about replicas, before any connection, never echoing a password."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.parse
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from app.database import (
    DatabaseConfigError,
    DatabaseNotInitializedError,
    DatabaseSessionManager,
)
from app.database import _replicas as _replicas_module
from app.database._drain import Drain
from tests.faults.canary import assert_no_canary, exception_channels
from tests.faults.server import CANARY_PASSWORD as CANARY

ENCODED = urllib.parse.quote(CANARY, safe="")
PRIMARY = f"postgresql+asyncpg://app:{ENCODED}@primary:5432/app"
REPLICA = f"postgresql+asyncpg://app:{ENCODED}@replica:5432/app"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replica_urls": REPLICA}, "must be a list of URLs"),
        ({"replica_urls": [REPLICA.replace("asyncpg", "psycopg")]}, "use the same driver"),
        ({"replica_urls": [f"postgresql://app:{ENCODED}@replica/app"]}, r"replica_urls\[0\]: "),
        ({"replica_urls": [REPLICA, f"postgresql+asyncpg://app:{CANARY}@r2/app"]}, r"\[1\]"),
        ({"replica_urls": [REPLICA], "max_replica_lag": 0}, "max_replica_lag must be"),
        ({"replica_urls": [REPLICA], "max_replica_lag": 0.5}, r"probed every 0.5 s"),
        ({"replica_urls": [REPLICA], "max_replica_lag": True}, "max_replica_lag must be"),
        ({"replica_urls": [REPLICA], "max_replica_lag": math.inf}, "a finite number"),
        ({"replica_urls": [REPLICA], "max_replica_lag": math.nan}, "a finite number"),
        (
            {"replica_urls": [REPLICA], "isolation_level": "SERIALIZABLE"},
            r"per unit of work \(session\(isolation_level='SERIALIZABLE'\)",
        ),
    ],
    ids=[
        "a string",
        "another driver",
        "no driver",
        "unescaped password",
        "lag 0",
        "lag under a probe interval",
        "lag bool",
        "lag infinite",
        "lag nan",
        "serializable engine",
    ],
)
def test_bad_replica_options_are_refused_naming_the_fix(
    options: dict[str, Any], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    manager = DatabaseSessionManager()
    with pytest.raises(DatabaseConfigError, match=message) as refused:
        manager.init(PRIMARY, **options)
    assert_no_canary(
        {**exception_channels(refused.value), "repr(manager)": repr(manager), "logs": caplog.text}
    )
    assert "open" not in repr(manager)  # nothing half-built is left open


def test_replicas_of_a_non_postgresql_primary_are_refused() -> None:
    manager = DatabaseSessionManager()
    with pytest.raises(DatabaseConfigError, match="PostgreSQL streaming replicas"):
        manager.init("sqlite+aiosqlite://", replica_urls=["sqlite+aiosqlite://"])


async def test_status_names_each_replica_without_credentials() -> None:
    manager = DatabaseSessionManager()
    manager.init(PRIMARY, replica_urls=[REPLICA])
    try:
        [status] = manager.replica_status()
        assert status == {
            "replica": "replica:5432/app",
            "in_use": False,  # not probed yet: never used before a probe says standby
            "lag_seconds": None,
            "failure": None,
        }
        assert_no_canary({"status": repr(manager.replica_status()), "repr": repr(manager)})
    finally:
        await manager.close()


def _replicas(*states: dict[str, Any]) -> _replicas_module.Replicas:
    replicas = []
    for number, state in enumerate(states):
        engine = create_async_engine(f"postgresql+asyncpg://app@replica-{number}/app")
        replica = _replicas_module.Replica(f"replica-{number}", engine, Drain(engine, _refusal))
        now = time.monotonic()
        for name, value in state.items():
            setattr(replica, name, now + value if name.startswith("last_") else value)
        replicas.append(replica)
    primary = create_async_engine("postgresql+asyncpg://app@primary/app")
    return _replicas_module.Replicas(primary, replicas, max_lag=5.0)


def _refusal() -> DatabaseNotInitializedError:
    return DatabaseNotInitializedError("closed")


# Times as seconds before the replicas are built (last_success 0: probed just now).
HEALTHY = {"is_standby": True, "lag": 0.1, "last_success": 0.0, "last_failure": -1000.0}


async def test_reads_are_spread_over_every_usable_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    replicas = _replicas(HEALTHY, HEALTHY, HEALTHY)
    monkeypatch.setattr(replicas, "ensure_watching", lambda: None)
    picked = {replicas.pick(0).name for _ in range(200)}  # type: ignore[union-attr]
    assert picked == {"replica-0", "replica-1", "replica-2"}


@pytest.mark.parametrize(
    "unusable",
    [
        {**HEALTHY, "is_standby": None},  # never probed
        {**HEALTHY, "is_standby": False},  # a primary
        {**HEALTHY, "lag": 5.5},  # behind max_replica_lag
        {**HEALTHY, "last_failure": 0.001},  # failed since its last good probe
        {**HEALTHY, "last_success": -6.0},  # no probe for longer than max_replica_lag
    ],
    ids=["unprobed", "primary", "lagging", "failed", "probes stopped"],
)
async def test_a_replica_that_cannot_serve_is_never_picked(
    unusable: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    replicas = _replicas(unusable, HEALTHY)
    monkeypatch.setattr(replicas, "ensure_watching", lambda: None)
    assert {replicas.pick(0).name for _ in range(50)} == {"replica-1"}  # type: ignore[union-attr]
    alone = _replicas(unusable)
    monkeypatch.setattr(alone, "ensure_watching", lambda: None)
    assert alone.pick(0) is None  # the primary serves


async def test_a_replica_known_to_have_replayed_the_position_is_preferred(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    replicas = _replicas({**HEALTHY, "replayed": 100}, {**HEALTHY, "replayed": 500})
    monkeypatch.setattr(replicas, "ensure_watching", lambda: None)
    assert {replicas.pick(400).name for _ in range(50)} == {"replica-1"}  # type: ignore[union-attr]
    # None known to be there yet: any usable one, whose position the read then checks.
    assert {replicas.pick(900).name for _ in range(200)} == {"replica-0", "replica-1"}  # type: ignore[union-attr]


def test_lag_is_the_age_of_the_oldest_position_not_replayed() -> None:
    replicas = _replicas(HEALTHY)
    replicas._samples.extend([(10.0, 100), (10.5, 200), (11.0, 200), (11.5, 300)])
    assert replicas._lag(200, now=12.0) == 0.5  # 300, sampled at 11.5, is not
    assert replicas._lag(150, now=12.0) == 1.5
    # Everything sampled replayed: what came after the newest sample is not known.
    assert replicas._lag(300, now=12.0) == 0.5


def test_a_replica_behind_the_oldest_sample_has_an_unknown_lag() -> None:
    """At start-up the history is young: a replica behind all of it may be hours behind."""
    replicas = _replicas(HEALTHY)
    assert replicas._lag(10**9, now=12.0) == math.inf  # no sample yet
    replicas._samples.extend([(11.5, 300)])
    assert replicas._lag(299, now=12.0) == math.inf
    assert replicas._lag(300, now=12.0) == 0.5


async def test_close_ends_probes_that_swallowed_a_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """asyncio.wait_for before 3.12 can return a result that arrives with the cancel."""
    replicas = _replicas(HEALTHY)
    swallowed = asyncio.Event()

    async def probe_all_swallowing_once() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if swallowed.is_set():
                raise
            swallowed.set()  # as wait_for does when the inner result wins the race

    monkeypatch.setattr(replicas, "probe_all", probe_all_swallowing_once)
    replicas.ensure_watching()
    await asyncio.sleep(0.05)
    await asyncio.wait_for(replicas.close(grace=0), 5)
    assert swallowed.is_set()
    replicas.ensure_watching()  # closed: no new probes
    assert replicas._watcher is None


async def test_a_max_replica_lag_of_exactly_the_minimum_is_accepted() -> None:
    """max_replica_lag may be as low as MIN_REPLICA_LAG_SECONDS itself: the bound is inclusive."""
    manager = DatabaseSessionManager()
    manager.init(
        PRIMARY, replica_urls=[REPLICA], max_replica_lag=_replicas_module.MIN_REPLICA_LAG_SECONDS
    )
    try:
        assert [status["replica"] for status in manager.replica_status()] == ["replica:5432/app"]
    finally:
        await manager.close()
