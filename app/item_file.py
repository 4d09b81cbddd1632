"""Reading and validating an item file (CSV or JSON) before anything is written.

Rows keep their position in the file (a CSV line, a JSON array index) so that
every error can tell the user where to look.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TextIO, TypeVar

from pydantic import ValidationError

from app.schemas import ItemCreate

MAX_PROBLEMS_SHOWN = 50  # a file that is wrong throughout should not flood the terminal


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
