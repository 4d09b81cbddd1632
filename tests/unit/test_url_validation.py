"""init() refuses URLs and options it cannot safely use, before creating anything."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy.engine import URL

from app.database import DatabaseConfigError, DatabaseSessionManager


@pytest.mark.parametrize(
    ("url", "suggestion"),
    [
        ("postgresql+psycopg2://app@db/app", "postgresql+asyncpg://"),
        ("postgresql://app@db/app", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
        ("sqlite:///demo.db", "sqlite+aiosqlite://"),
        ("sqlite+pysqlite:///demo.db", "sqlite+aiosqlite://"),
        ("mysql+pymysql://app@db/app", "mysql+aiomysql://"),
    ],
)
def test_sync_driver_is_refused_naming_the_async_one(
    manager: DatabaseSessionManager, url: str, suggestion: str
) -> None:
    """A URL that resolves to a synchronous driver is refused with the async one to use."""
    with pytest.raises(DatabaseConfigError, match=re.escape(suggestion)):
        manager.init(url=url)
    assert repr(manager) == "<DatabaseSessionManager new>"


@pytest.mark.parametrize(
    "url", ["not a url", "", "postgresql+asyncpg://app:pw@db:notaport/app", "://nothing"]
)
def test_unparseable_url_is_refused(manager: DatabaseSessionManager, url: str) -> None:
    """An unparseable URL gets an error showing the expected form."""
    with pytest.raises(DatabaseConfigError, match="could not be parsed"):
        manager.init(url=url)


@pytest.mark.parametrize("url", [None, 123, b"postgresql+asyncpg://db/app", {"url": "x"}])
def test_non_string_url_is_refused(manager: DatabaseSessionManager, url: object) -> None:
    """Only a URL string (or a sqlalchemy URL) is accepted, not a settings object."""
    with pytest.raises(DatabaseConfigError, match="must be a string"):
        manager.init(url=url)  # type: ignore[arg-type]  # the wrong type is the test


def test_unknown_dialect_is_refused(manager: DatabaseSessionManager) -> None:
    """A dialect SQLAlchemy does not know is named in the error."""
    with pytest.raises(DatabaseConfigError, match="unknown database dialect 'mysql\\+asyncpg'"):
        manager.init(url="mysql+asyncpg://app@db/app")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("pool_size", 0),
        ("pool_size", -1),
        ("pool_size", True),
        ("pool_size", "5"),
        ("pool_size", 2.5),
        ("max_overflow", -2),
        ("max_overflow", "10"),
    ],
)
def test_bad_pool_sizes_are_refused(
    manager: DatabaseSessionManager, option: str, value: Any
) -> None:
    """pool_size=0 (which QueuePool reads as unbounded) and non-integers are refused."""
    with pytest.raises(DatabaseConfigError, match=f"{option} must be an integer"):
        manager.init(url="postgresql+asyncpg://app@db/app", **{option: value})


async def test_async_urls_and_url_objects_are_accepted(manager: DatabaseSessionManager) -> None:
    """Async drivers pass, and a sqlalchemy URL object is accepted as well as a string."""
    for url in (
        "sqlite+aiosqlite:///:memory:",
        URL.create("postgresql+asyncpg", username="app", password="p@ss:/#", host="db"),
    ):
        manager.init(url=url)
        await manager.close()
