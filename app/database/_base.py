"""The declarative base that domain models extend, and an opt-in naming convention."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase

# Opt-in, for a new service (README, "Models and constraint names"): named
# constraints let Alembic autogenerate migrations that can later drop or alter a
# constraint by name, identically on PostgreSQL and SQLite. Not on `Base` itself:
# an existing service that moved its models onto it would have its migrations
# name constraints differently on new databases than on those created before.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(AsyncAttrs, DeclarativeBase):
    """Base class for models; `AsyncAttrs` adds `await obj.awaitable_attrs.<name>`.

    Its metadata keeps SQLAlchemy's default constraint names (the database's own,
    e.g. `items_pkey`); see `NAMING_CONVENTION` to name them instead.
    """
