"""The benchmark's schema and its simulated test: 10 tables chained by foreign keys.

The tables live on their own `MetaData`, not the app's `Base`, so the figures do
not move when the app's models change.
"""

from __future__ import annotations

from itertools import pairwise

from sqlalchemy import (
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    insert,
    select,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import FromClause

from app.database import DatabaseSessionManager

TABLE_COUNT = 10
ROWS_PER_TEST = 5

metadata = MetaData()


def _table(number: int) -> Table:
    columns: list[Column[object]] = [
        Column("id", Integer, primary_key=True),
        Column("name", String(100), nullable=False, unique=True),
        Column("amount", Integer, nullable=False),
    ]
    if number > 1:
        columns.append(Column("parent_id", ForeignKey(f"t{number - 1}.id"), nullable=False))
    table = Table(f"t{number}", metadata, *columns)
    # PostgreSQL does not index foreign keys itself; real schemas do, and TRUNCATE,
    # drop_all and CREATE DATABASE all pay for every index.
    Index(f"ix_t{number}_amount", table.c.amount)
    if number > 1:
        Index(f"ix_t{number}_parent_id", table.c.parent_id)
    return table


TABLES = [_table(number) for number in range(1, TABLE_COUNT + 1)]
# A test writes one row in each of the first tables, each row the child of the last.
WRITTEN = TABLES[:ROWS_PER_TEST]

TRUNCATE_ALL = f"TRUNCATE {', '.join(t.name for t in TABLES)} RESTART IDENTITY CASCADE"


# The 5 rows of one test, joined parent to child: one SELECT reads them all back.
_chain: FromClause = WRITTEN[0]
for _parent, _child in pairwise(WRITTEN):
    _chain = _chain.join(_child, _child.c.parent_id == _parent.c.id)
READ_BACK = (
    select(*(table.c.name for table in WRITTEN))
    .select_from(_chain)
    .where(WRITTEN[0].c.id == bindparam("root_id"))
)


async def simulated_test(manager: DatabaseSessionManager, key: str) -> None:
    """One simulated test: write 5 rows in one unit of work, read them back, check them.

    `key` must be unique among the rows the database already holds.
    """
    expected = tuple(f"{key}/{table.name}" for table in WRITTEN)
    async with manager.session() as session:
        parent_id: int | None = None
        root_id: int | None = None
        for table, name in zip(WRITTEN, expected, strict=True):
            values: dict[str, object] = {"name": name, "amount": len(name)}
            if parent_id is not None:
                values["parent_id"] = parent_id
            parent_id = await session.scalar(insert(table).values(values).returning(table.c.id))
            root_id = root_id or parent_id
        row = (await session.execute(READ_BACK, {"root_id": root_id})).one()
    # Not `assert`: the check must also run under `python -O`.
    if row._tuple() != expected:
        raise RuntimeError(f"read back {row._tuple()!r}, expected {expected!r}")


async def row_count(connection: AsyncConnection) -> int:
    """How many rows all 10 tables hold together."""
    total = 0
    for table in TABLES:
        total += await connection.scalar(select(func.count()).select_from(table)) or 0
    return total
