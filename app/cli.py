"""Batch import of items: `python -m app.cli import FILE [--batch-size N]`.

The whole file is validated before anything is written, so a bad row costs nothing;
rows are then written in batches of one transaction each.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.exc import DBAPIError
from tqdm import tqdm

from app.config import database_url
from app.database import DatabaseConfigError, session_manager
from app.item_file import ImportFailed, ValidRow, read_rows, validate
from app.models import Item

DEFAULT_BATCH_SIZE = 500
# The existence check binds one parameter per name: stay under driver limits (~32k).
MAX_BATCH_SIZE = 10_000
EPILOG = """\
The whole file (CSV with a name,description header, or a JSON array of objects)
is validated first, duplicate names included: if any row is bad, nothing is written.
Rows are then written in batches, one transaction each. If a batch fails (a name
already in the table, or another database error) it is rolled back, but batches
before it STAY COMMITTED: the error says how many rows were committed, and
re-running the same file will report those names as already existing, so remove
those lines first. CSV rows are named by line (the header is line 1), JSON items
by array index (from 0)."""


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
