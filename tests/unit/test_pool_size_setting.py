"""DATABASE_POOL_SIZE: the reference service's pool, as the operator sized it."""

from __future__ import annotations

import pytest

from app.config import database_options


@pytest.mark.parametrize(("value", "pool_size"), [("4", 4), (" 30 ", 30)])
def test_pool_size_is_passed_as_given(
    monkeypatch: pytest.MonkeyPatch, value: str, pool_size: int
) -> None:
    """Only pool_size: the package's default of no overflow makes it the whole pool."""
    monkeypatch.setenv("DATABASE_POOL_SIZE", value)

    options = database_options()

    assert options["pool_size"] == pool_size
    assert "max_overflow" not in options


def test_unset_leaves_the_package_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_POOL_SIZE", raising=False)

    assert "pool_size" not in database_options()


@pytest.mark.parametrize("value", ["0", "-1", "ten", "2.5"])
def test_anything_but_a_positive_integer_is_refused(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """0 included: SQLAlchemy would read it as an unbounded pool."""
    monkeypatch.setenv("DATABASE_POOL_SIZE", value)

    with pytest.raises(ValueError, match="DATABASE_POOL_SIZE must be a positive integer"):
        database_options()
