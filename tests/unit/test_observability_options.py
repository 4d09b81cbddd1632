"""Observability without a database: the optional extra, and the service's switches."""

from __future__ import annotations

import os
import textwrap

import pytest

from app.config import slow_unit_seconds, telemetry_enabled
from tests.paths import REPO_ROOT
from tests.subprocesses import run_python

# Python as it would run without the otel extra: imports of the modules named in
# argv fail. With FastAPI, which needs opentelemetry-api, only the instrumentation
# and the SDK are missing; a batch job without FastAPI may have no OpenTelemetry.
WITHOUT_OTEL_EXTRA = textwrap.dedent(
    """
    import asyncio, importlib.abc, sys

    BLOCKED = tuple(sys.argv[1:])

    class WithoutOtelExtra(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or name.startswith(tuple(f"{b}." for b in BLOCKED)):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, WithoutOtelExtra())

    import app.database
    if "opentelemetry" in BLOCKED:
        from app.database import disable_telemetry, enable_telemetry
    else:
        from app.database import *  # every name, those needing the extra too
    from sqlalchemy import text

    async def main():
        manager = app.database.DatabaseSessionManager()
        manager.init("sqlite+aiosqlite:///:memory:")
        app.database.log_slow_units(0.0)
        async with manager.session() as db:
            assert await db.scalar(text("SELECT 1")) == 1
        await manager.close()
        disable_telemetry()  # nothing was enabled: a shutdown may call it anyway
        try:
            enable_telemetry()
        except ModuleNotFoundError as error:
            print(error)
        assert not any(name.startswith(BLOCKED) for name in sys.modules)

    asyncio.run(main())
    """
)


@pytest.mark.parametrize(
    "blocked",
    [
        pytest.param(("opentelemetry",), id="no-opentelemetry"),
        pytest.param(
            ("opentelemetry.instrumentation", "opentelemetry.sdk"), id="fastapi-opentelemetry-api"
        ),
    ],
)
async def test_the_package_works_without_the_otel_extra(blocked: tuple[str, ...]) -> None:
    """Imports (`import *` too where FastAPI imports), runs a unit, logs slow units;
    enable_telemetry and disable_telemetry import, enable_telemetry() names the extra
    and disable_telemetry() does nothing."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = await run_python("-c", WITHOUT_OTEL_EXTRA, *blocked, cwd=REPO_ROOT, env=env)

    assert result.returncode == 0, result.output
    assert "slow unit of work: caller=__main__.main" in result.stderr
    assert "enable_telemetry needs OpenTelemetry's SQLAlchemy instrumentation" in result.stdout
    assert "fastapi-db-session[otel]" in result.stdout


@pytest.mark.parametrize(
    ("value", "enabled"), [("", False), ("0", False), ("false", False), ("1", True), ("True", True)]
)
def test_database_telemetry_switch(
    monkeypatch: pytest.MonkeyPatch, value: str, enabled: bool
) -> None:
    monkeypatch.setenv("DATABASE_TELEMETRY", value)
    assert telemetry_enabled() is enabled


def test_database_telemetry_refuses_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_TELEMETRY", "yes")
    with pytest.raises(ValueError, match="DATABASE_TELEMETRY must be 0 or 1, got 'yes'"):
        telemetry_enabled()


@pytest.mark.parametrize(("value", "seconds"), [("", None), (" ", None), ("0.5", 0.5), ("2", 2.0)])
def test_slow_unit_seconds(monkeypatch: pytest.MonkeyPatch, value: str, seconds: float) -> None:
    monkeypatch.setenv("DATABASE_SLOW_UNIT_SECONDS", value)
    assert slow_unit_seconds() == seconds


@pytest.mark.parametrize("value", ["-1", "soon", "nan"])
def test_slow_unit_seconds_refuses_what_is_no_duration(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("DATABASE_SLOW_UNIT_SECONDS", value)
    with pytest.raises(ValueError, match="DATABASE_SLOW_UNIT_SECONDS must be seconds >= 0"):
        slow_unit_seconds()
