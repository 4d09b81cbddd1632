"""The app shape every variant implements: its table, its SQL, its request and response bodies.

Every variant sends the same statement text: asyncpg numbers its parameters,
SQLAlchemy's asyncpg dialect renders `text()`'s named ones as the same `$1, $2`,
and psycopg turns its `%s` and `%(name)s` placeholders into `$1, $2` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from sqlalchemy import TextClause, text

TABLE = "bench_rows"
INITIAL_ROWS = 1000
"""GET asks for ids 1..INITIAL_ROWS, which exist from the start."""

POOL_SIZE = 5
MAX_OVERFLOW = 10
POOL_CAPACITY = POOL_SIZE + MAX_OVERFLOW
"""Every variant may hold this many connections at once (raw pools: min=max)."""

CREATE_TABLE = (
    f"CREATE TABLE {TABLE} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " name text NOT NULL, amount integer NOT NULL)"
)
FILL_TABLE = (
    f"INSERT INTO {TABLE} (name, amount)"
    f" SELECT 'initial:' || n, n FROM generate_series(1, {INITIAL_ROWS}) AS n"
)
# A POST names its row `<configuration>:<n>` (e.g. `ours.psycopg.pgbouncer:7`): the
# count per prefix proves each configuration's POSTs were committed, so a layer
# that forgot to commit cannot look fast.
COUNT_BY_VARIANT = f"SELECT split_part(name, ':', 1) AS variant, count(*) FROM {TABLE} GROUP BY 1"

SELECT_ROW = f"SELECT id, name, amount FROM {TABLE} WHERE id = $1"
INSERT_ROW = f"INSERT INTO {TABLE} (name, amount) VALUES ($1, $2) RETURNING id"
# Raw psycopg's placeholders; the server sees the same text as above.
SELECT_ROW_PSYCOPG = f"SELECT id, name, amount FROM {TABLE} WHERE id = %s"
INSERT_ROW_PSYCOPG = f"INSERT INTO {TABLE} (name, amount) VALUES (%s, %s) RETURNING id"
SELECT_ROW_TEXT: TextClause = text(f"SELECT id, name, amount FROM {TABLE} WHERE id = :id")
INSERT_ROW_TEXT: TextClause = text(
    f"INSERT INTO {TABLE} (name, amount) VALUES (:name, :amount) RETURNING id"
)


class RowIn(BaseModel):
    """The body of `POST /rows`."""

    name: str
    amount: int


class RowOut(BaseModel):
    """The body of `GET /rows/{id}`."""

    id: int
    name: str
    amount: int


class Created(BaseModel):
    """The body of a `201` from `POST /rows`."""

    id: int


def row_out(row: Mapping[Any, Any]) -> RowOut:
    """An asyncpg `Record`, a psycopg `dict_row` or a SQLAlchemy `RowMapping` as the body."""
    return RowOut(id=row["id"], name=row["name"], amount=row["amount"])
