"""Counting the SQL statements a block of code runs, to catch N+1 lazy loads."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection

from .._read_only import INTERNAL_OPTION

# Savepoint statements: the isolation adds them around every unit of work, so they
# are left out (and so, note, are those of the code's own begin_nested()).
_SAVEPOINT_STATEMENT = re.compile(
    r"^\s*(SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT)\b", re.IGNORECASE
)


@dataclass
class QueryCount:
    """The SQL statements run on a connection while `count_queries()` was active."""

    statements: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.statements)

    def __str__(self) -> str:
        listing = "".join(f"\n  {n}. {sql}" for n, sql in enumerate(self.statements, 1))
        return f"{self.count} statements:{listing}"


@contextmanager
def count_queries(connection: AsyncConnection) -> Iterator[QueryCount]:
    """Record the statements run on `connection`, savepoint statements (and the
    package's own, such as a read-only unit's `SET TRANSACTION READ ONLY`) left out.

    `assert queries.count == 2, queries` then catches an N+1 lazy load, and the
    failure message lists every statement. Statements on other connections (for
    example the engine's own `connect()`) are not seen.
    """
    seen = QueryCount()

    def record(*args: Any) -> None:
        statement: str = args[2]  # (conn, cursor, statement, parameters, context, many)
        context = args[4]
        if context is not None and context.execution_options.get(INTERNAL_OPTION):
            return  # the package's own (a read-only unit's SET TRANSACTION READ ONLY)
        if not _SAVEPOINT_STATEMENT.match(statement):
            seen.statements.append(" ".join(statement.split()))

    target = connection.sync_connection
    if target is None:
        raise RuntimeError("count_queries() needs an open connection")
    event.listen(target, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(target, "before_cursor_execute", record)
