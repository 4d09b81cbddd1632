"""What the pytest plugin reports: residue past the isolation, and no password anywhere."""

from __future__ import annotations

import pytest
from sqlalchemy import make_url

from app.database.testing._alembic import (
    _test_database_config,
    _UrlOverriddenError,
    _without_password,
)
from app.database.testing.pytest_plugin import _residue

URL = make_url("postgresql+asyncpg://app:s3cr%40t%2Fx@db.example:5432/app_test")


def test_the_whole_url_and_the_password_alone_are_masked() -> None:
    message = (
        f"could not connect to {URL.render_as_string(hide_password=False)}; "
        "password s3cr@t/x rejected; quoted: s3cr%40t%2Fx; as a form: s3cr%40t%2Fx"
    )

    shown = _without_password(message, URL)

    assert "s3cr" not in shown
    assert "postgresql+asyncpg://app:***@db.example:5432/app_test" in shown


def test_residue_names_rows_and_tables_created_or_dropped_past_the_isolation() -> None:
    seeded = {"users": 2, "alembic_version": 1, "audit": 0}
    counts = {"users": 3, "alembic_version": 1, "scratch": 0}

    assert _residue(seeded, counts) == [
        "rows persisted past the rollback isolation: {'users': 1}",
        "tables created past it: ['scratch']",
        "tables dropped past it: ['audit']",
    ]


def test_no_residue_when_every_table_is_as_the_schema_build_left_it() -> None:
    assert _residue({"users": 2}, {"users": 2}) == []


def test_a_url_env_py_tries_to_set_is_refused_without_its_own_password() -> None:
    """The service's URL (its password not the test database's) is refused and masked."""
    config = _test_database_config((None, None), URL)

    with pytest.raises(_UrlOverriddenError) as refused:
        config.set_main_option("sqlalchemy.url", "postgresql+asyncpg://svc:dev-only-pw@db/shop")

    assert "dev-only-pw" not in str(refused.value)
    assert "postgresql+asyncpg://svc:***@db/shop" in str(refused.value)
    assert "s3cr" not in str(refused.value)
