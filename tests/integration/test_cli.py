"""End-to-end tests of `python -m app.cli import`, run as a subprocess on real PostgreSQL.

Self-contained on purpose: the module makes, migrates and drops its own database
(named after the suite's) instead of relying on the shared fixtures in conftest.py.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import URL

from app.database.testing import create_test_database, drop_test_database
from tests.migrations import run_alembic
from tests.paths import REPO_ROOT
from tests.postgres import asyncpg_dsn
from tests.subprocesses import Result, run_python

# Trust auth ignores the password, so it only shows whether the CLI leaks it.
CANARY = "S3cretCanary"


async def run_cli(url: URL, *args: str) -> Result:
    # A subprocess, not main(): the CLI runs its own event loop with asyncio.run.
    env = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False)}
    return await run_python("-m", "app.cli", *args, cwd=REPO_ROOT, env=env)


def write_items(path: Path, items: list[dict[str, str]]) -> Path:
    """`items` as CSV or JSON, by the suffix; in CSV item i is on line i + 2, after the header."""
    if path.suffix == ".json":
        path.write_text(json.dumps(items, indent=2), encoding="utf-8")
        return path
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["name", "description"])
        writer.writeheader()
        writer.writerows(items)
    return path


async def run_import(url: URL, path: Path, items: list[dict[str, str]], *options: str) -> Result:
    return await run_cli(url, "import", str(write_items(path, items)), *options)


def make_items(count: int) -> list[dict[str, str]]:
    return [{"name": f"item-{i:02d}", "description": f"description {i}"} for i in range(count)]


@pytest.fixture(name="cli_url", scope="module")
async def cli_url_fixture(database_url: URL) -> AsyncIterator[URL]:
    """A database of this module's own, migrated to head, dropped afterwards."""
    own = database_url.set(database=f"{database_url.database}_cli")
    await create_test_database(own)
    try:
        migrated = await run_alembic("upgrade", "head", database_url=own)
        assert migrated.returncode == 0, migrated.output
        yield own
    finally:
        await drop_test_database(own)


@pytest.fixture(name="db", scope="module")
async def db_fixture(cli_url: URL) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to check what the CLI committed."""
    connection = await asyncpg.connect(asyncpg_dsn(cli_url))
    yield connection
    await connection.close()


@pytest.fixture(name="empty_db", autouse=True)
async def empty_db_fixture(db: asyncpg.Connection) -> asyncpg.Connection:
    """The direct connection, with the items table emptied before the test."""
    await db.execute("TRUNCATE items RESTART IDENTITY")
    return db


async def table(db: asyncpg.Connection) -> dict[str, str | None]:
    rows = await db.fetch("SELECT name, description FROM items")
    return {row["name"]: row["description"] for row in rows}


@pytest.mark.parametrize("suffix", [".csv", ".json"])
async def test_import_writes_rows_in_batches(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path, suffix: str
) -> None:
    """25 rows, CSV or JSON, with --batch-size 10 are written in 3 batches, every row present."""
    items = make_items(25)
    result = await run_import(cli_url, tmp_path / f"items{suffix}", items, "--batch-size", "10")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported 25 items in 3 batches"
    assert result.stderr == ""  # the progress bar is off when stderr is not a TTY
    assert await table(db) == {item["name"]: item["description"] for item in items}


async def test_import_stores_empty_csv_description_as_null(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An empty CSV description becomes NULL, and a quoted multi-line one is kept whole."""
    path = tmp_path / "items.csv"
    path.write_text('name,description\nplain,\nquoted,"two\nlines"\n', encoding="utf-8")
    result = await run_cli(cli_url, "import", str(path))

    assert result.returncode == 0, result.stderr
    assert await table(db) == {"plain": None, "quoted": "two\nlines"}


async def test_import_reports_bad_csv_line_and_writes_nothing(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An empty name on line 14 fails the run, naming line 14 and the field, with 0 rows written."""
    items = make_items(25)
    items[12]["name"] = "   "  # whitespace is stripped, as the API does
    result = await run_import(cli_url, tmp_path / "items.csv", items, "--batch-size", "10")

    assert result.returncode == 1
    assert "error: line 14: field 'name': String should have at least 1 character" in result.stderr
    assert "nothing was written" in result.stderr
    assert await table(db) == {}


async def test_import_names_physical_csv_line_after_multiline_field(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Line numbers count physical lines: quoted newlines and blank lines included."""
    path = tmp_path / "items.csv"
    path.write_text('name,description\na,"line 2\nline 3"\n\nb,\n,line 6\n', encoding="utf-8")
    result = await run_cli(cli_url, "import", str(path))

    assert result.returncode == 1
    assert "error: line 6: field 'name'" in result.stderr
    assert await table(db) == {}


async def test_import_reports_bad_json_item_and_writes_nothing(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A JSON item without a name fails the run, naming its index, with 0 rows written."""
    items = make_items(5)
    del items[3]["name"]
    result = await run_import(cli_url, tmp_path / "items.json", items)

    assert result.returncode == 1
    assert "error: item 3: field 'name': Field required" in result.stderr
    assert await table(db) == {}


async def test_import_reports_both_lines_of_in_file_duplicate(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A name repeated within the file names both lines and writes nothing."""
    items = make_items(25)
    items[20]["name"] = items[3]["name"]  # lines 22 and 5
    result = await run_import(cli_url, tmp_path / "items.csv", items, "--batch-size", "10")

    assert result.returncode == 1
    assert "error: line 22: name 'item-03' duplicates line 5" in result.stderr
    assert await table(db) == {}


async def test_import_keeps_committed_batches_when_a_name_exists(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A name already in the table in batch 3 fails there; batches 1 and 2 stay committed."""
    items = make_items(25)
    await db.execute("INSERT INTO items (name) VALUES ('item-22')")  # line 24, batch 3
    result = await run_import(cli_url, tmp_path / "items.csv", items, "--batch-size", "10")

    assert result.returncode == 1
    assert "error: line 24: name 'item-22' already exists" in result.stderr
    assert "20 rows (up to line 21) were committed before the failure" in result.stderr
    assert "re-running this file will report their names as already existing" in result.stderr
    names = set(await table(db))
    assert names == {item["name"] for item in items[:20]} | {"item-22"}


async def test_import_reports_batch_line_range_on_database_error(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Any other database error in batch 3 names that batch's lines; earlier batches stay."""
    items = make_items(25)
    # Stands in for a failure the pre-insert check cannot see, e.g. a concurrent writer.
    await db.execute("ALTER TABLE items ADD CONSTRAINT not_24 CHECK (name <> 'item-24')")
    try:
        result = await run_import(cli_url, tmp_path / "items.csv", items, "--batch-size", "10")
    finally:
        await db.execute("ALTER TABLE items DROP CONSTRAINT not_24")

    assert result.returncode == 1
    assert "error: lines 22-26: database error:" in result.stderr
    assert "not_24" in result.stderr
    assert "20 rows (up to line 21) were committed" in result.stderr
    assert len(await table(db)) == 20


async def test_import_rejects_unknown_extension(cli_url: URL, tmp_path: Path) -> None:
    """A file that is neither .csv nor .json is refused with a clear error."""
    path = tmp_path / "items.txt"
    path.write_text("name,description\na,b\n", encoding="utf-8")
    result = await run_cli(cli_url, "import", str(path))

    assert result.returncode == 1
    assert result.stderr == "error: unsupported file type '.txt': use .csv or .json\n"


async def test_import_reports_missing_file(cli_url: URL, tmp_path: Path) -> None:
    """A file that does not exist is reported, not raised as a traceback."""
    result = await run_cli(cli_url, "import", str(tmp_path / "absent.csv"))

    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot read ")
    assert "No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def _with_secret(url: URL) -> tuple[URL, str]:
    """The URL and a password to look for: its real one, else a canary (trust auth ignores it)."""
    if url.password:
        return url, str(url.password)
    return url.set(password=CANARY), CANARY


async def test_import_never_prints_password_on_success(cli_url: URL, tmp_path: Path) -> None:
    """A successful run does not echo the database URL or its password."""
    url, secret = _with_secret(cli_url)
    result = await run_import(url, tmp_path / "items.csv", make_items(3))

    assert result.returncode == 0, result.stderr
    assert secret not in result.output


@pytest.mark.parametrize(
    "breaks",
    [
        pytest.param(lambda url: url, id="name-exists"),
        pytest.param(lambda url: url.set(database=f"{url.database}_absent"), id="no-such-database"),
        pytest.param(lambda url: url.set(host="127.0.0.1", port=1), id="connection-refused"),
        pytest.param(lambda url: url.set(drivername="postgresql"), id="url-without-driver"),
    ],
)
async def test_import_never_prints_password_on_error(
    cli_url: URL, db: asyncpg.Connection, tmp_path: Path, breaks: Callable[[URL], URL]
) -> None:
    """Failing runs, database and configuration errors alike, do not echo the password."""
    await db.execute("INSERT INTO items (name) VALUES ('item-00')")
    url, secret = _with_secret(cli_url)
    result = await run_import(breaks(url), tmp_path / "items.csv", make_items(3))

    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert secret not in result.output
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["import", "--help"]])
async def test_help_says_committed_batches_stay(cli_url: URL, args: list[str]) -> None:
    """--help warns that batches committed before a failure stay committed."""
    result = await run_cli(cli_url, *args)

    assert result.returncode == 0
    assert "STAY COMMITTED" in result.stdout
    assert "re-running the same file will report those names as already existing" in " ".join(
        result.stdout.split()
    )
