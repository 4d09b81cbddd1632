"""End-to-end tests of `python -m app.cli import`, run as a subprocess on real PostgreSQL.

Self-contained on purpose: the module makes, migrates and drops its own database
instead of relying on the shared fixtures in conftest.py.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER = "127.0.0.1:5432"
DB_NAME = f"cli_test_{os.getpid()}"
DATABASE_URL = f"postgresql+asyncpg://postgres@{SERVER}/{DB_NAME}"
# Trust auth ignores the password, so it only shows whether the CLI leaks it.
CANARY = "S3cretCanary"
CANARY_URL = f"postgresql+asyncpg://postgres:{CANARY}@{SERVER}/{DB_NAME}"


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


async def run(*args: str, url: str = DATABASE_URL) -> Result:
    # A subprocess, not main(): the CLI runs its own event loop with asyncio.run.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        cwd=REPO_ROOT,
        env={**os.environ, "DATABASE_URL": url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


async def run_cli(*args: str, url: str = DATABASE_URL) -> Result:
    return await run("-m", "app.cli", *args, url=url)


def make_items(count: int) -> list[dict[str, str]]:
    return [{"name": f"item-{i:02d}", "description": f"description {i}"} for i in range(count)]


def write_csv(path: Path, items: list[dict[str, str]]) -> Path:
    """Item i lands on line i + 2: the header is line 1."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["name", "description"])
        writer.writeheader()
        writer.writerows(items)
    return path


def write_json(path: Path, items: list[dict[str, str]]) -> Path:
    path.write_text(json.dumps(items, indent=2), encoding="utf-8")
    return path


@pytest.fixture(name="cli_database", scope="module")
async def cli_database_fixture() -> AsyncIterator[None]:
    """A fresh database for this module, migrated to head, dropped afterwards."""
    admin = await asyncpg.connect(f"postgresql://postgres@{SERVER}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{DB_NAME}"')
        try:
            migrated = await run("-m", "alembic", "upgrade", "head")
            assert migrated.code == 0, migrated.stderr
            yield
        finally:
            await admin.execute(f'DROP DATABASE "{DB_NAME}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(name="db", scope="module")
async def db_fixture(cli_database: None) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to check what the CLI committed."""
    connection = await asyncpg.connect(f"postgresql://postgres@{SERVER}/{DB_NAME}")
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


async def test_import_writes_csv_rows_in_batches(db: asyncpg.Connection, tmp_path: Path) -> None:
    """A 25-row CSV with --batch-size 10 is written in 3 batches, every row present."""
    items = make_items(25)
    result = await run_cli(
        "import", str(write_csv(tmp_path / "items.csv", items)), "--batch-size", "10"
    )

    assert result.code == 0, result.stderr
    assert result.stdout.strip() == "imported 25 items in 3 batches"
    assert result.stderr == ""  # the progress bar is off when stderr is not a TTY
    assert await table(db) == {item["name"]: item["description"] for item in items}


async def test_import_writes_json_items_in_batches(db: asyncpg.Connection, tmp_path: Path) -> None:
    """A 25-item JSON array with --batch-size 10 is written in 3 batches, every item present."""
    items = make_items(25)
    result = await run_cli(
        "import", str(write_json(tmp_path / "items.json", items)), "--batch-size", "10"
    )

    assert result.code == 0, result.stderr
    assert result.stdout.strip() == "imported 25 items in 3 batches"
    assert await table(db) == {item["name"]: item["description"] for item in items}


async def test_import_stores_empty_csv_description_as_null(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An empty CSV description becomes NULL, and a quoted multi-line one is kept whole."""
    path = tmp_path / "items.csv"
    path.write_text('name,description\nplain,\nquoted,"two\nlines"\n', encoding="utf-8")
    result = await run_cli("import", str(path))

    assert result.code == 0, result.stderr
    assert await table(db) == {"plain": None, "quoted": "two\nlines"}


async def test_import_reports_bad_csv_line_and_writes_nothing(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """An empty name on line 14 fails the run, naming line 14 and the field, with 0 rows written."""
    items = make_items(25)
    items[12]["name"] = "   "  # whitespace is stripped, as the API does
    result = await run_cli(
        "import", str(write_csv(tmp_path / "items.csv", items)), "--batch-size", "10"
    )

    assert result.code == 1
    assert "error: line 14: field 'name': String should have at least 1 character" in result.stderr
    assert "nothing was written" in result.stderr
    assert await db.fetchval("SELECT count(*) FROM items") == 0


async def test_import_names_physical_csv_line_after_multiline_field(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Line numbers count physical lines: quoted newlines and blank lines included."""
    path = tmp_path / "items.csv"
    path.write_text('name,description\na,"line 2\nline 3"\n\nb,\n,line 6\n', encoding="utf-8")
    result = await run_cli("import", str(path))

    assert result.code == 1
    assert "error: line 6: field 'name'" in result.stderr
    assert await db.fetchval("SELECT count(*) FROM items") == 0


async def test_import_reports_bad_json_item_and_writes_nothing(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A JSON item without a name fails the run, naming its index, with 0 rows written."""
    items: list[dict[str, str]] = make_items(5)
    del items[3]["name"]
    result = await run_cli("import", str(write_json(tmp_path / "items.json", items)))

    assert result.code == 1
    assert "error: item 3: field 'name': Field required" in result.stderr
    assert await db.fetchval("SELECT count(*) FROM items") == 0


async def test_import_reports_both_lines_of_in_file_duplicate(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A name repeated within the file names both lines and writes nothing."""
    items = make_items(25)
    items[20]["name"] = items[3]["name"]  # lines 22 and 5
    result = await run_cli(
        "import", str(write_csv(tmp_path / "items.csv", items)), "--batch-size", "10"
    )

    assert result.code == 1
    assert "error: line 22: name 'item-03' duplicates line 5" in result.stderr
    assert await db.fetchval("SELECT count(*) FROM items") == 0


async def test_import_keeps_committed_batches_when_a_name_exists(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """A name already in the table in batch 3 fails there; batches 1 and 2 stay committed."""
    items = make_items(25)
    await db.execute("INSERT INTO items (name) VALUES ('item-22')")  # line 24, batch 3
    result = await run_cli(
        "import", str(write_csv(tmp_path / "items.csv", items)), "--batch-size", "10"
    )

    assert result.code == 1
    assert "error: line 24: name 'item-22' already exists" in result.stderr
    assert "20 rows (up to line 21) were committed before the failure" in result.stderr
    assert "re-running this file will report their names as already existing" in result.stderr
    names = set(await table(db))
    assert names == {item["name"] for item in items[:20]} | {"item-22"}


async def test_import_reports_batch_line_range_on_database_error(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    """Any other database error in batch 3 names that batch's lines; earlier batches stay."""
    items = make_items(25)
    # Stands in for a failure the pre-insert check cannot see, e.g. a concurrent writer.
    await db.execute("ALTER TABLE items ADD CONSTRAINT not_24 CHECK (name <> 'item-24')")
    try:
        path = write_csv(tmp_path / "items.csv", items)
        result = await run_cli("import", str(path), "--batch-size", "10")
    finally:
        await db.execute("ALTER TABLE items DROP CONSTRAINT not_24")

    assert result.code == 1
    assert "error: lines 22-26: database error:" in result.stderr
    assert "not_24" in result.stderr
    assert "20 rows (up to line 21) were committed" in result.stderr
    assert await db.fetchval("SELECT count(*) FROM items") == 20


async def test_import_rejects_unknown_extension(tmp_path: Path) -> None:
    """A file that is neither .csv nor .json is refused with a clear error."""
    path = tmp_path / "items.txt"
    path.write_text("name,description\na,b\n", encoding="utf-8")
    result = await run_cli("import", str(path))

    assert result.code == 1
    assert result.stderr == "error: unsupported file type '.txt': use .csv or .json\n"


async def test_import_reports_missing_file(tmp_path: Path) -> None:
    """A file that does not exist is reported, not raised as a traceback."""
    result = await run_cli("import", str(tmp_path / "absent.csv"))

    assert result.code == 1
    assert result.stderr.startswith("error: cannot read ")
    assert "No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


async def test_import_never_prints_password_on_success(tmp_path: Path) -> None:
    """A successful run does not echo the database URL or its password."""
    path = write_csv(tmp_path / "items.csv", make_items(3))
    result = await run_cli("import", str(path), url=CANARY_URL)

    assert result.code == 0, result.stderr
    assert CANARY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(CANARY_URL, id="name-exists"),
        pytest.param(CANARY_URL.replace(DB_NAME, f"{DB_NAME}_absent"), id="no-such-database"),
        pytest.param(CANARY_URL.replace(SERVER, "127.0.0.1:1"), id="connection-refused"),
        pytest.param(CANARY_URL.replace("+asyncpg", ""), id="url-without-driver"),
    ],
)
async def test_import_never_prints_password_on_error(
    db: asyncpg.Connection, tmp_path: Path, url: str
) -> None:
    """Failing runs, database and configuration errors alike, do not echo the password."""
    await db.execute("INSERT INTO items (name) VALUES ('item-00')")
    path = write_csv(tmp_path / "items.csv", make_items(3))
    result = await run_cli("import", str(path), url=url)

    assert result.code == 1
    assert result.stderr.startswith("error: ")
    assert CANARY not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--help"], ["import", "--help"]])
async def test_help_says_committed_batches_stay(args: list[str]) -> None:
    """--help warns that batches committed before a failure stay committed."""
    result = await run_cli(*args)

    assert result.code == 0
    assert "STAY COMMITTED" in result.stdout
    assert "re-running the same file will report those names as already existing" in " ".join(
        result.stdout.split()
    )
