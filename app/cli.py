"""Batch import of items: `python -m app.cli import FILE [--batch-size N]`.

The whole file is validated before anything is written, so a bad row costs nothing;
rows are then written in batches of one transaction each.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TextIO, TypeVar

from pydantic import ValidationError
from sqlalchemy import insert, select
from sqlalchemy.exc import DBAPIError
from tqdm import tqdm

from app.config import database_url
from app.database import DatabaseConfigError, session_manager
from app.models import Item
from app.schemas import ItemCreate

DEFAULT_BATCH_SIZE = 500
# The existence check binds one parameter per name: stay under driver limits (~32k).
MAX_BATCH_SIZE = 10_000
MAX_PROBLEMS_SHOWN = 50  # a file that is wrong throughout should not flood the terminal
EPILOG = """\
The whole file (CSV with a name,description header, or a JSON array of objects)
is validated first, duplicate names included: if any row is bad, nothing is written.
Rows are then written in batches, one transaction each. If a batch fails (a name
already in the table, or another database error) it is rolled back, but batches
before it STAY COMMITTED: the error says how many rows were committed, and
re-running the same file will report those names as already existing, so remove
those lines first. CSV rows are named by line (the header is line 1), JSON items
by array index (from 0)."""


class ImportFailed(Exception):
    """A problem for the user; each line of the message is reported separately."""


T = TypeVar("T")


@dataclass(frozen=True)
class Row(Generic[T]):
    unit: str  # "line" (CSV) or "item" (JSON): how the user finds the row in the file
    number: int
    data: T  # the parsed record, then (after validate) its ItemCreate

    def __str__(self) -> str:
        return f"{self.unit} {self.number}"


ValidRow = Row[ItemCreate]


def _csv_rows(file: TextIO) -> list[Row[object]]:
    reader = csv.reader(file)
    header = [field.strip() for field in next(reader, [])]
    if sorted(header) not in (["name"], ["description", "name"]):
        raise ImportFailed(f"line 1: header must be name,description, got {','.join(header)!r}")
    rows: list[Row[object]] = []
    start = reader.line_num + 1  # line_num counts physical lines, quoted newlines included
    for fields in reader:
        if len(fields) not in (0, len(header)):  # 0: a blank line
            raise ImportFailed(f"line {start}: expected {len(header)} fields, got {len(fields)}")
        if fields:
            data: dict[str, str | None] = dict(zip(header, fields, strict=True))
            data["description"] = data.get("description") or None  # CSV cannot say null
            rows.append(Row("line", start, data))
        start = reader.line_num + 1
    return rows


def _json_rows(file: TextIO) -> list[Row[object]]:
    try:
        data = json.load(file)
    except json.JSONDecodeError as exc:
        raise ImportFailed(
            f"invalid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, list):
        raise ImportFailed("the JSON file must hold a top-level array of objects")
    return [Row("item", index, obj) for index, obj in enumerate(data)]


def read_rows(path: Path) -> list[Row[object]]:
    """The file's unvalidated rows, parsed as its extension says."""
    parse = {".csv": _csv_rows, ".json": _json_rows}.get(path.suffix.lower())
    if parse is None:
        raise ImportFailed(f"unsupported file type {path.suffix or '(none)'!r}: use .csv or .json")
    try:
        # utf-8-sig: spreadsheet programs often start their CSV exports with a BOM.
        with path.open(encoding="utf-8-sig", newline="") as file:
            return parse(file)
    except OSError as exc:
        raise ImportFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ImportFailed(f"cannot parse {path}: {exc}") from None


def validate(rows: Sequence[Row[object]]) -> list[ValidRow]:
    """The rows with ItemCreate data, or ImportFailed naming every bad row and duplicate."""
    valid: list[ValidRow] = []
    problems: list[str] = []
    first_seen: dict[str, Row[object]] = {}
    for row in rows:
        try:
            item = ItemCreate.model_validate(row.data)
        except ValidationError as exc:
            for err in exc.errors():
                field = f"field {'.'.join(map(str, err['loc']))!r}: " if err["loc"] else ""
                problems.append(f"{row}: {field}{err['msg']}")
            continue
        if (first := first_seen.setdefault(item.name, row)) is not row:
            problems.append(f"{row}: name {item.name!r} duplicates {first}")
        valid.append(Row(row.unit, row.number, item))
    if problems:
        hidden = len(problems) - MAX_PROBLEMS_SHOWN
        if hidden > 0:
            problems[MAX_PROBLEMS_SHOWN:] = [f"... and {hidden} more problems"]
        raise ImportFailed("\n".join([*problems, "nothing was written"]))
    return valid


def _committed_note(committed: Sequence[ValidRow]) -> str:
    if not committed:
        return "0 rows were committed before the failure: nothing was written"
    return (
        f"{len(committed)} rows (up to {committed[-1]}) were committed before the failure and "
        "stay in the table: re-running this file will report their names as already "
        "existing, so remove those lines first"
    )


def _database_error(batch: Sequence[ValidRow], exc: Exception) -> str:
    first, last = batch[0], batch[-1]
    span = f"{first.unit}s {first.number}-{last.number}" if first is not last else str(first)
    # The driver's message: SQLAlchemy's own would append the whole SQL statement.
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    reason = str(cause).strip().splitlines() or [type(cause).__name__]
    return f"{span}: database error: {reason[0]}"


async def _insert_batch(batch: Sequence[ValidRow]) -> None:
    by_name = {row.data.name: row for row in batch}
    async with session_manager.session() as session:
        existing = set(await session.scalars(select(Item.name).where(Item.name.in_(by_name))))
        if existing:  # raising rolls the batch back
            raise ImportFailed(
                "\n".join(
                    f"{row}: name {name!r} already exists"
                    for name, row in by_name.items()
                    if name in existing
                )
            )
        await session.execute(insert(Item), [row.data.model_dump() for row in batch])


async def write(rows: Sequence[ValidRow], batch_size: int) -> int:
    """Insert validated rows, one transaction per batch; return the number of batches."""
    batches = [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    committed = 0
    # disable=None: no bar when stderr is not a terminal (pipes, CI logs).
    with tqdm(total=len(rows), unit="item", file=sys.stderr, disable=None) as progress:
        for batch in batches:
            try:
                await _insert_batch(batch)
            # Exception, not SQLAlchemyError: under SQLAlchemy 2.0 asyncpg's errors at
            # connect time (e.g. an unknown database) arrive unwrapped.
            except Exception as exc:
                reason = str(exc) if isinstance(exc, ImportFailed) else _database_error(batch, exc)
                raise ImportFailed(f"{reason}\n{_committed_note(rows[:committed])}") from None
            committed += len(batch)
            progress.update(len(batch))
    return len(batches)


async def import_rows(rows: Sequence[ValidRow], batch_size: int) -> int:
    session_manager.init(url=database_url())
    try:
        return await write(rows, batch_size)
    finally:
        await session_manager.close()


def _batch_size(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_BATCH_SIZE:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {MAX_BATCH_SIZE}")
    return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    texts: dict[str, Any] = {
        "epilog": EPILOG,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    parser = argparse.ArgumentParser(prog="python -m app.cli", description=__doc__, **texts)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("import", help="import items from a .csv or .json file", **texts)
    command.add_argument("file", type=Path, help="a .csv or .json file of items")
    command.add_argument(
        "--batch-size",
        type=_batch_size,
        metavar="N",
        default=DEFAULT_BATCH_SIZE,
        help=f"rows per transaction (default {DEFAULT_BATCH_SIZE})",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows = validate(read_rows(args.file))
        batches = asyncio.run(import_rows(rows, args.batch_size))
    except (ImportFailed, DatabaseConfigError) as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    print(f"imported {len(rows)} items in {batches} {'batch' if batches == 1 else 'batches'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
