"""The package's public surface: exactly the documented names, and typed."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path
from typing import get_args

import fastapi
import pytest
from fastapi.params import Depends
from packaging.version import Version
from sqlalchemy.ext.asyncio import AsyncSession

import app.database

PACKAGE_README = Path(app.database.__file__).parent / "README.md"


def _documented_names() -> list[str]:
    """The names in the first column of the package README's "Public API" table."""
    section = PACKAGE_README.read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    return sorted(re.findall(r"^\| `(\w+)(?:\(\))?` \|", section, re.MULTILINE))


def test_all_lists_exactly_the_documented_names() -> None:
    """`__all__` names exactly what the package README documents (ruff's RUF022 sorts it)."""
    assert sorted(app.database.__all__) == _documented_names()


def test_every_public_name_resolves() -> None:
    """Each name in `__all__`, including the lazily loaded ones, can be imported."""
    for name in app.database.__all__:
        assert getattr(app.database, name) is not None


def test_unknown_attribute_raises_attribute_error() -> None:
    """The lazy loader does not swallow typos."""
    with pytest.raises(AttributeError, match="get_dbb"):
        _ = app.database.get_dbb


def test_package_ships_py_typed() -> None:
    """Type checkers see the package's annotations once it is copied."""
    assert (Path(app.database.__file__).parent / "py.typed").is_file()


def test_session_dependency_runs_in_function_scope() -> None:
    """AsyncSessionDep commits before the response: its Depends has scope="function"."""
    annotated_type, dependency = get_args(app.database.AsyncSessionDep)

    assert annotated_type is AsyncSession
    assert isinstance(dependency, Depends)
    assert dependency.dependency is app.database.get_db
    assert dependency.scope == "function"


def test_installed_fastapi_supports_function_scope() -> None:
    """FastAPI 0.121.1 is the first release where scope="function" dependencies are sound."""
    assert Version(fastapi.__version__) >= Version("0.121.1")


def test_installed_sqlalchemy_is_at_least_the_tested_floor() -> None:
    """SQLAlchemy 2.0.58 is the oldest release the suite runs on (see the README's floors)."""
    assert Version(importlib.metadata.version("sqlalchemy")) >= Version("2.0.58")
