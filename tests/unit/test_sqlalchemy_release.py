"""init() warns, with the reason and the fix, on a SQLAlchemy older than the README's floor."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import sqlalchemy

import app.database
from app.database import DatabaseSessionManager, UnsupportedSQLAlchemyWarning
from app.database._sqlalchemy_release import SQLALCHEMY_FLOOR, warn_below_floor


@pytest.mark.parametrize("version", ["2.0.46", "2.0.57", "2.0.0b4", "1.4.54"])
def test_an_older_release_is_warned_about_with_the_fix(version: str) -> None:
    with pytest.warns(UnsupportedSQLAlchemyWarning) as caught:
        warn_below_floor(version)

    message = str(caught[0].message)
    assert f"SQLAlchemy {version} is older than 2.0.58" in message
    assert "out of the pool" in message
    assert "pip install 'sqlalchemy[asyncio]>=2.0.58'" in message


@pytest.mark.parametrize("version", ["2.0.58", "2.0.59", "2.1.0b1", "2.1.9", "3.0.0"])
def test_the_floor_and_later_releases_pass_silently(version: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_below_floor(version)


def test_the_floor_is_the_one_the_readme_states() -> None:
    readme = Path(app.database.__file__).with_name("README.md")
    floor = ".".join(map(str, SQLALCHEMY_FLOOR))
    assert f"sqlalchemy[asyncio]>={floor}" in readme.read_text()


async def test_init_warns_on_the_installed_release_when_it_is_older(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sqlalchemy, "__version__", "2.0.46")
    manager = DatabaseSessionManager()

    with pytest.warns(UnsupportedSQLAlchemyWarning, match="2.0.46") as caught:
        manager.init(url="sqlite+aiosqlite://")
    await manager.close()

    # Pointing at the caller's init() line, not at the package's inside.
    assert caught[0].filename == __file__
