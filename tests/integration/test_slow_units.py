"""The slow-unit log: the route or caller, duration, statements and pool wait; no values."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import (
    AsyncSessionDep,
    DatabaseConfigError,
    DatabaseSessionManager,
    _fastapi,
    _signals,
    log_slow_units,
)

LOGGER = "app.database.slow_units"
SECRET = "a-parameter-value-that-must-not-be-logged"


@pytest.fixture(name="manager")
async def manager_fixture(database_url: URL) -> AsyncIterator[DatabaseSessionManager]:
    manager = DatabaseSessionManager()
    manager.init(database_url, pool_size=1)
    try:
        yield manager
    finally:
        await manager.close()


@pytest.fixture(autouse=True)
def _log_off_after() -> Iterator[None]:
    yield
    log_slow_units(None)


def _lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == LOGGER]


async def _two_statements(manager: DatabaseSessionManager) -> None:
    async with manager.session() as db:
        await db.execute(text("SELECT :secret"), {"secret": SECRET})
        await db.execute(text("SELECT pg_sleep(0.05)"))


async def test_a_slow_unit_is_logged_with_its_caller_and_counts_never_its_values(
    manager: DatabaseSessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning: the calling function, duration, statements, pool wait, outcome."""
    log_slow_units(0.05)
    with caplog.at_level(logging.WARNING, LOGGER):
        await _two_statements(manager)

    [line] = _lines(caplog)
    caller = f"{__name__}._two_statements"
    assert line.levelno == logging.WARNING
    assert re.fullmatch(
        rf"slow unit of work: caller={re.escape(caller)} duration=\d+\.\d{{3}}s statements=2 "
        r"pool_wait=\d+\.\d{3}s outcome=committed read_only=false threshold=0\.050s",
        line.getMessage(),
    ), line.getMessage()
    assert line.unit_caller == caller  # type: ignore[attr-defined]
    assert line.unit_duration >= 0.05  # type: ignore[attr-defined]
    assert line.unit_statements == 2  # type: ignore[attr-defined]
    assert SECRET not in line.getMessage()
    assert SECRET not in repr(vars(line))


async def test_units_under_the_threshold_and_with_the_log_off_are_not_logged(
    manager: DatabaseSessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """A threshold above the unit's duration, and None (off, the default), log nothing."""
    log_slow_units(10.0)
    with caplog.at_level(logging.WARNING, LOGGER):
        await _two_statements(manager)
        log_slow_units(None)
        await _two_statements(manager)

    assert _lines(caplog) == []
    assert not _signals.unit_ended  # off: the units are not even observed


async def test_a_route_is_named_by_its_method_and_path_template(
    manager: DatabaseSessionManager,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request's unit names its route ("GET /things/{thing_id}"), not the path sent."""
    monkeypatch.setattr(_fastapi, "session_manager", manager)
    app = FastAPI()

    @app.get("/things/{thing_id}")
    async def thing(thing_id: str, db: AsyncSessionDep) -> str:
        return str(await db.scalar(text("SELECT :id"), {"id": thing_id}))

    log_slow_units(0.0)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with caplog.at_level(logging.WARNING, LOGGER):
            response = await client.get(f"/things/{SECRET}")

    assert response.status_code == 200
    [line] = _lines(caplog)
    assert "caller=GET /things/{thing_id} " in line.getMessage()
    assert " statements=1 " in line.getMessage()
    assert SECRET not in line.getMessage()


async def test_run_in_transaction_names_the_code_that_called_it(
    manager: DatabaseSessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    log_slow_units(0.0)

    async def work(db: AsyncSession) -> None:
        await db.execute(text("SELECT 1"))

    with caplog.at_level(logging.WARNING, LOGGER):
        await manager.run_in_transaction(work)

    [line] = _lines(caplog)
    caller = f"{__name__}.test_run_in_transaction_names_the_code_that_called_it"
    assert f"caller={caller} " in line.getMessage()


async def test_the_line_gives_the_wait_for_a_pooled_connection(
    manager: DatabaseSessionManager, caplog: pytest.LogCaptureFixture
) -> None:
    """A unit queued 0.2 s behind the pool's only connection says so."""
    log_slow_units(0.15)
    held, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        async with manager.session() as db:
            await db.execute(text("SELECT 1"))
            held.set()
            await release.wait()

    async def queued() -> None:
        async with manager.session() as db:
            await db.execute(text("SELECT 2"))

    with caplog.at_level(logging.WARNING, LOGGER):
        holder = asyncio.create_task(hold())
        await held.wait()
        waiter = asyncio.create_task(queued())
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.gather(holder, waiter)

    waits = sorted(line.unit_pool_wait for line in _lines(caplog))  # type: ignore[attr-defined]
    assert len(waits) == 2  # the holder is slow too
    assert waits[0] < 0.1 <= 0.15 <= waits[1]


@pytest.mark.parametrize("threshold", [-1, "1", True, math.nan])
def test_a_threshold_that_is_no_number_of_seconds_is_refused(threshold: object) -> None:
    with pytest.raises(DatabaseConfigError, match=r"log_slow_units\(\) takes a number of seconds"):
        log_slow_units(threshold)  # type: ignore[arg-type]
