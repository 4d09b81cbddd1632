"""The pytest plugin in a project of its own: one line enables it, with or without xdist."""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection

from app.database.testing.pytest_plugin import _row_counts
from tests.paths import REPO_ROOT

# The plugin, and the model on the package's Base, whose metadata create_all builds.
PLUGIN_CONFTEST = """
import probe_notes  # noqa: F401

pytest_plugins = ["app.database.testing.pytest_plugin"]
"""

# In a module of its own, so that a conftest can seed the table before any test runs.
NOTES_MODEL = """
from sqlalchemy.orm import Mapped, mapped_column

from app.database import Base


class Note(Base):
    __tablename__ = "plugin_probe_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]
"""

NOTES_TESTS = """
from sqlalchemy import func, select

from app.database import session_manager
from probe_notes import Note


async def _count(session):
    return await session.scalar(select(func.count()).select_from(Note))


async def test_a_code_under_test_commits(db_session):
    async with session_manager.session() as db:
        db.add(Note(body="written by the code under test"))
    assert await _count(db_session) == 1


async def test_b_nothing_left_from_the_other_test(db_session):
    assert await _count(db_session) == 0
"""

SEEDING_CONFTEST = """
import pytest
from sqlalchemy import insert

from app.database import Base
from probe_notes import Note

pytest_plugins = ["app.database.testing.pytest_plugin"]


@pytest.fixture(scope="session", name="database_migrate")
def database_migrate_fixture():
    def migrate(connection):
        Base.metadata.create_all(connection)
        connection.execute(insert(Note), [{"body": "seeded"}])

    return migrate
"""

SEEDED_TESTS = """
from sqlalchemy import select

from app.database import session_manager
from probe_notes import Note


async def _bodies(session):
    return sorted(await session.scalars(select(Note.body)))


async def test_a_code_under_test_commits(db_session):
    async with session_manager.session() as db:
        db.add(Note(body="written by the code under test"))
    assert await _bodies(db_session) == ["seeded", "written by the code under test"]


async def test_b_only_the_seeded_row_is_left(db_session):
    assert await _bodies(db_session) == ["seeded"]
"""

ESCAPING_TESTS = """
from sqlalchemy import insert

from probe_notes import Note


async def test_commits_outside_the_isolation(database, db_session):
    async with database.engine.begin() as connection:
        await connection.execute(insert(Note), [{"body": "escaped"}])
"""

LEAKING_TESTS = """
LEAKED = []


async def test_a_keeps_a_connection(database, db_connection):
    LEAKED.append(await database.engine.connect())


async def test_b_innocent_after_the_leak(db_connection):
    pass


async def test_c_release(database):
    await LEAKED.pop().close()
"""

# The plugin appends `_<pid>_<4 hex>` (at most 13 characters) to the base name,
# and PostgreSQL truncates names past 63.
MAX_BASE_NAME = 63 - 13


@pytest.fixture(name="probe_name")
def probe_name_fixture(request: pytest.FixtureRequest) -> str:
    """The base name of this test's inner runs, shared with no other test or worker."""
    # Our pid tells this worker's runs from the other worker's; the test's name (cut
    # short, with a checksum of all of it) tells this test's from the previous one's.
    name = request.node.name
    slug = re.sub(r"\W+", "_", name.removeprefix("test_"))[:16].strip("_")
    base = f"plugin_probe_{os.getpid()}_{slug}_{zlib.crc32(name.encode()):08x}"
    assert len(base) <= MAX_BASE_NAME, base
    return base


def _project(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    server: URL,
    *,
    asyncio_mode: str | None = "auto",
    fixture_loop_scope: str | None = "session",
    test_loop_scope: str | None = "session",
    conftest: str = PLUGIN_CONFTEST,
) -> None:
    """An inner project using the plugin on `server`: ini, conftest and the notes model."""
    # The inner runs import this repository's package, and name their server by ini.
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    monkeypatch.delenv("TEST_DATABASE_URL", raising=False)
    mode = f"asyncio_mode = {asyncio_mode}" if asyncio_mode else ""
    # None leaves the setting out, to pytest-asyncio's default.
    fixture_scope = (
        f"asyncio_default_fixture_loop_scope = {fixture_loop_scope}" if fixture_loop_scope else ""
    )
    test_scope = f"asyncio_default_test_loop_scope = {test_loop_scope}" if test_loop_scope else ""
    pytester.makeini(
        f"""
        [pytest]
        {mode}
        {fixture_scope}
        {test_scope}
        filterwarnings = error
        test_database_url = {server.render_as_string(hide_password=False)}
        """
    )
    pytester.makeconftest(conftest)
    pytester.makepyfile(probe_notes=NOTES_MODEL)


@pytest.fixture(name="server")
def server_fixture(database_url: URL, probe_name: str) -> URL:
    """The outer run's server, with this test's base name for the inner runs' databases."""
    return database_url.set(database=probe_name)


async def _leftover_probe_databases(observer: asyncpg.Connection, probe_name: str) -> int:
    count: int = await observer.fetchval(
        "SELECT count(*) FROM pg_database WHERE starts_with(datname, $1)", f"{probe_name}_"
    )
    return count


class InnerProject:
    """A project of its own that uses the plugin, and pytest run on it in a subprocess."""

    def __init__(
        self, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, server: URL
    ) -> None:
        self._pytester, self._monkeypatch, self._server = pytester, monkeypatch, server

    def run(self, *args: str, files: dict[str, str], **project: Any) -> pytest.RunResult:
        """Write the project (`project` goes to `_project`) and `files`, then run pytest."""
        _project(self._pytester, self._monkeypatch, self._server, **project)
        self._pytester.makepyfile(**files)
        return self._pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


@pytest.fixture(name="inner")
async def inner_fixture(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    server: URL,
    probe_name: str,
    observer: asyncpg.Connection,
) -> AsyncIterator[InnerProject]:
    """An inner project; after the test, none of its runs' databases may be left behind."""
    yield InnerProject(pytester, monkeypatch, server)
    assert await _leftover_probe_databases(observer, probe_name) == 0


@pytest.mark.parametrize(
    "workers",
    # loadfile: both tests on one worker, or the second could not show the first's rollback.
    [[], ["-n", "2", "--dist", "loadfile"]],
    ids=["serial", "xdist"],
)
async def test_one_line_enables_isolated_tests(
    inner: InnerProject,
    workers: list[str],
) -> None:
    """A new project's tests are isolated, each process on its own database, dropped after."""
    result = inner.run(*workers, files={"test_notes": NOTES_TESTS})

    result.assert_outcomes(passed=2)


async def test_strict_mode_with_session_loop_markers_works(
    inner: InnerProject,
) -> None:
    """In pytest-asyncio's default strict mode, tests marked for the session loop are isolated."""
    # No asyncio_mode line: strict is pytest-asyncio's default.
    marked = 'import pytest\n\npytestmark = pytest.mark.asyncio(loop_scope="session")\n'
    result = inner.run(files={"test_notes": marked + NOTES_TESTS}, asyncio_mode=None)

    result.assert_outcomes(passed=2)


async def test_rows_seeded_by_the_migration_are_not_residue(
    inner: InnerProject,
) -> None:
    """A row the schema build inserts is visible to the tests and not reported at the end."""
    result = inner.run(files={"test_seeded": SEEDED_TESTS}, conftest=SEEDING_CONFTEST)

    result.assert_outcomes(passed=2)
    assert "rows persisted" not in result.stdout.str() + result.stderr.str()


async def test_commit_outside_the_isolation_is_reported_at_the_end(
    inner: InnerProject,
) -> None:
    """A row committed through a connection of its own is residue, counted past the seeded."""
    result = inner.run(files={"test_escaping": ESCAPING_TESTS}, conftest=SEEDING_CONFTEST)

    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["*rows persisted past the rollback isolation: {'plugin_probe_notes': 1}*"]
    )


# A function-scoped async fixture of the project's own, on the run's database: on an
# event loop of its own it would fail with "attached to a different loop".
FIXTURE_LOOP_TESTS = (
    """
import pytest
from sqlalchemy import func, select

from probe_notes import Note


@pytest.fixture
async def note_count(db_session):
    return await db_session.scalar(select(func.count()).select_from(Note))
"""
    + NOTES_TESTS
    + """

async def test_c_a_fixture_of_the_project_own_shares_the_loop(note_count):
    assert note_count == 0
"""
)


@pytest.mark.parametrize(
    ("fixture_loop_scope", "test_loop_scope", "to_change"),
    [
        (None, "session", ['asyncio_default_fixture_loop_scope = "session"*unset*']),
        ("function", "session", ['asyncio_default_fixture_loop_scope = "session"*function*']),
        ("fixture-scope", "session", ['asyncio_default_fixture_loop_scope = "session"*']),
        ("session", None, ['asyncio_default_test_loop_scope = "session"*function*']),
        ("session", "function", ['asyncio_default_test_loop_scope = "session"*function*']),
        (
            None,
            None,
            ['*asyncio_default_fixture_loop_scope = "session"*asyncio_default_test_loop_scope*'],
        ),
        ("session", "session", None),
    ],
    ids=[
        "fixture-unset",
        "fixture-function",
        "fixture-scope",
        "test-unset",
        "test-function",
        "both-unset",
        "both-session",
    ],
)
async def test_loop_scopes_are_checked_before_the_run(
    inner: InnerProject,
    fixture_loop_scope: str | None,
    test_loop_scope: str | None,
    to_change: list[str] | None,
) -> None:
    """Either loop scope other than session would cross the engine's loop: refused, naming it.

    Checked at start-up, not found later as "attached to a different loop".
    """
    result = inner.run(
        files={"test_notes": FIXTURE_LOOP_TESTS},
        fixture_loop_scope=fixture_loop_scope,
        test_loop_scope=test_loop_scope,
    )

    if to_change is None:
        result.assert_outcomes(passed=3)
        return
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    result.stderr.fnmatch_lines([f"*{line}" for line in to_change])


async def test_connection_left_checked_out_fails_only_that_test(
    inner: InnerProject,
) -> None:
    """A test that keeps a pooled connection is reported; a later test is not blamed for it."""
    result = inner.run(files={"test_leak": LEAKING_TESTS})

    # The leak fails the leaking test's teardown: an error, on that test alone.
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*1 connection(s) still checked out after the test*",
            "ERROR test_leak.py::test_a_keeps_a_connection*",
        ]
    )


# A service's models on a DeclarativeBase of its own, and the override that builds them.
OWN_BASE_CONFTEST = """
import pytest
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

pytest_plugins = ["app.database.testing.pytest_plugin"]


class OwnBase(DeclarativeBase):
    pass


class Tag(OwnBase):
    __tablename__ = "plugin_probe_tags"

    id: Mapped[int] = mapped_column(primary_key=True)


@pytest.fixture(scope="session")
def database_metadata():
    return OwnBase.metadata
"""

OWN_BASE_TESTS = """
from sqlalchemy import text


async def test_the_own_base_tables_exist(db_session):
    assert await db_session.scalar(text("SELECT count(*) FROM plugin_probe_tags")) == 0
"""


async def test_database_metadata_points_create_all_at_the_service_base(
    inner: InnerProject,
) -> None:
    """Without an alembic.ini, the schema comes from the metadata the override returns."""
    result = inner.run(files={"test_tags": OWN_BASE_TESTS}, conftest=OWN_BASE_CONFTEST)

    result.assert_outcomes(passed=1)


async def test_no_schema_to_build_stops_the_run_naming_the_override(
    inner: InnerProject,
) -> None:
    """No alembic.ini and nothing on the package's Base: a message, not missing tables."""
    conftest = 'pytest_plugins = ["app.database.testing.pytest_plugin"]'
    result = inner.run(files={"test_tags": OWN_BASE_TESTS}, conftest=conftest)

    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*no table in the database_metadata fixture's metadata*"])


async def test_a_partitioned_table_is_counted_once_through_its_parent(
    db_connection: AsyncConnection,
) -> None:
    """The leftover check counts a partitioned table's rows once, under the parent's name."""
    await db_connection.execute(
        text("CREATE TABLE plugin_probe_parted (id int) PARTITION BY RANGE (id)")
    )
    await db_connection.execute(
        text(
            "CREATE TABLE plugin_probe_parted_low PARTITION OF plugin_probe_parted "
            "FOR VALUES FROM (0) TO (100)"
        )
    )
    await db_connection.execute(text("INSERT INTO plugin_probe_parted VALUES (1)"))

    counts = await db_connection.run_sync(_row_counts)

    assert counts["plugin_probe_parted"] == 1
    assert "plugin_probe_parted_low" not in counts
