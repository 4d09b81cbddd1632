"""The pytest plugin in a project of its own: one line enables it, with or without xdist."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy.engine import URL

from tests.paths import REPO_ROOT

NOTES_TESTS = """
from sqlalchemy import func, select
from sqlalchemy.orm import Mapped, mapped_column

from app.database import Base, session_manager


class Note(Base):
    __tablename__ = "plugin_probe_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


async def _count(session):
    return await session.scalar(select(func.count()).select_from(Note))


async def test_a_code_under_test_commits(db_session):
    async with session_manager.session() as db:
        db.add(Note(body="written by the code under test"))
    assert await _count(db_session) == 1


async def test_b_nothing_left_from_the_other_test(db_session):
    assert await _count(db_session) == 0
"""


def _project(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    database_url: URL,
    test_loop_scope: str,
) -> None:
    # The inner runs import this repository's package, and name their server by ini.
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    server = database_url.set(database="plugin_probe").render_as_string(hide_password=False)
    pytester.makeini(
        f"""
        [pytest]
        asyncio_mode = auto
        asyncio_default_fixture_loop_scope = session
        asyncio_default_test_loop_scope = {test_loop_scope}
        filterwarnings = error
        test_database_url = {server}
        """
    )
    pytester.makeconftest('pytest_plugins = ["app.database.pytest_plugin"]')
    pytester.makepyfile(test_notes=NOTES_TESTS)


async def _leftover_probe_databases(observer: asyncpg.Connection) -> int:
    count: int = await observer.fetchval(
        "SELECT count(*) FROM pg_database WHERE datname LIKE 'plugin_probe%'"
    )
    return count


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["serial", "xdist"])
async def test_one_line_enables_isolated_tests(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    database_url: URL,
    observer: asyncpg.Connection,
    workers: list[str],
) -> None:
    """A new project's tests are isolated, each process on its own database, dropped after."""
    _project(pytester, monkeypatch, database_url, test_loop_scope="session")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *workers)

    result.assert_outcomes(passed=2)
    assert await _leftover_probe_databases(observer) == 0


async def test_mismatched_loop_scope_is_a_clear_error(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    database_url: URL,
    observer: asyncpg.Connection,
) -> None:
    """Tests on per-function event loops would cross the engine's loop: refused, not hung."""
    _project(pytester, monkeypatch, database_url, test_loop_scope="function")

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    assert result.ret != 0
    result.stdout.fnmatch_lines(['*asyncio_default_test_loop_scope = "session"*'])
    assert await _leftover_probe_databases(observer) == 0


async def test_connection_left_checked_out_fails_the_test(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    database_url: URL,
    observer: asyncpg.Connection,
) -> None:
    """A test that keeps a pooled connection past its end is reported, not left to leak."""
    _project(pytester, monkeypatch, database_url, test_loop_scope="session")
    pytester.makepyfile(
        test_leak="""
        import pytest

        LEAKED = []

        async def test_keeps_a_connection(database, db_connection):
            LEAKED.append(await database.engine.connect())

        async def test_zz_release(database):
            await LEAKED.pop().close()
        """
    )

    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "test_leak.py")

    result.stdout.fnmatch_lines(["*1 connection(s) still checked out after the test*"])
    assert await _leftover_probe_databases(observer) == 0
