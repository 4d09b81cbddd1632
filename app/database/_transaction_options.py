"""A unit of work's isolation level and read-only / deferrable flags, checked before it starts."""

from __future__ import annotations

from typing import Any

from ._errors import DatabaseConfigError

# What PostgreSQL offers (READ UNCOMMITTED behaves as READ COMMITTED there).
# AUTOCOMMIT is not one: a unit of work is one transaction.
ISOLATION_LEVELS = ("SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED", "READ UNCOMMITTED")


def transaction_options(
    isolation_level: str | None, read_only: bool, deferrable: bool
) -> dict[str, Any]:
    """SQLAlchemy execution options for the unit's connection; {} for the defaults."""
    options: dict[str, Any] = {}
    if isolation_level is not None:
        given = isolation_level if isinstance(isolation_level, str) else ""
        level = given.upper().replace("_", " ")
        if level not in ISOLATION_LEVELS:
            raise DatabaseConfigError(
                f"isolation_level must be one of {', '.join(map(repr, ISOLATION_LEVELS))} "
                f"(or None for the server's default), got {isolation_level!r}"
            )
        options["isolation_level"] = level
    for name, value in (("read_only", read_only), ("deferrable", deferrable)):
        if not isinstance(value, bool):
            raise DatabaseConfigError(f"{name} must be True or False, got {value!r}")
    if deferrable and not (read_only and options.get("isolation_level") == "SERIALIZABLE"):
        raise DatabaseConfigError(
            "deferrable=True only has an effect with read_only=True and "
            "isolation_level='SERIALIZABLE': pass all three, or drop deferrable"
        )
    if read_only:
        options["postgresql_readonly"] = True
    if deferrable:
        options["postgresql_deferrable"] = True
    return options
