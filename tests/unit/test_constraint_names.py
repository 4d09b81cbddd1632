"""`Base` keeps SQLAlchemy's default constraint names; NAMING_CONVENTION is opt-in.

Moving an existing service's models onto `Base` must not change the names its
migrations give constraints on new databases.
"""

from __future__ import annotations

from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, make_url
from sqlalchemy.schema import CreateTable

from app.database import NAMING_CONVENTION, Base
from app.models import Model

POSTGRESQL = make_url("postgresql+asyncpg://").get_dialect()()


def _ddl(metadata: MetaData) -> str:
    Table("author", metadata, Column("id", Integer, primary_key=True))
    book = Table(
        "book",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("title", String(50), unique=True),
        Column("author_id", Integer, ForeignKey("author.id")),
    )
    return str(CreateTable(book).compile(dialect=POSTGRESQL))


def test_base_leaves_constraints_to_the_database_default_names() -> None:
    # The same convention as Base's metadata, on a MetaData of the test's own.
    ddl = _ddl(MetaData(naming_convention=Base.metadata.naming_convention))

    assert "CONSTRAINT" not in ddl, ddl  # PostgreSQL names them book_pkey, ...


def test_the_convention_names_constraints_when_opted_into() -> None:
    ddl = _ddl(MetaData(naming_convention=NAMING_CONVENTION))

    assert "CONSTRAINT pk_book PRIMARY KEY (id)" in ddl
    assert "CONSTRAINT uq_book_title UNIQUE (title)" in ddl
    assert "CONSTRAINT fk_book_author_id_author FOREIGN KEY" in ddl


def test_the_reference_service_opts_in_as_its_migrations_name_them() -> None:
    constraints = {constraint.name for constraint in Model.metadata.tables["items"].constraints}

    assert {"pk_items", "uq_items_name"} <= constraints
