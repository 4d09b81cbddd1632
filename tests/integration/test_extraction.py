"""`app/database/` copied alone into another project still works there.

The package is meant to be lifted into other services: these tests prove it
imports nothing from `app`, that batch use does not need FastAPI at all, and
that `testing` (isolation without the plugin) needs neither FastAPI nor pytest.
Each script runs in a fresh interpreter, where only the copy is importable.
"""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from tests.paths import REPO_ROOT
from tests.subprocesses import Result, run_python

APP_SCRIPT = """
import asyncio
import importlib.util
import os

if importlib.util.find_spec("app") is not None:
    raise AssertionError("the reference app is importable: the copy is not tested alone")

import httpx
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.orm import Mapped, mapped_column

from database import AsyncSessionDep, Base, session_manager


class Probe(Base):
    __tablename__ = f"extraction_probe_{os.getpid()}"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str]


api = FastAPI()


@api.post("/probes", status_code=201)
async def add_probe(db: AsyncSessionDep) -> dict[str, str]:
    db.add(Probe(label="from-route"))
    return {"status": "added"}


@api.get("/probes")
async def count_probes(db: AsyncSessionDep) -> dict[str, int]:
    return {"count": await db.scalar(select(func.count()).select_from(Probe)) or 0}


async def count_committed() -> int:
    async with session_manager.session() as db:
        return await db.scalar(select(func.count()).select_from(Probe)) or 0


async def main() -> None:
    session_manager.init(url=os.environ["DATABASE_URL"])
    try:
        async with session_manager.engine.begin() as connection:
            await connection.run_sync(Base.metadata.create_all)
        try:
            transport = httpx.ASGITransport(app=api)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                assert (await client.post("/probes")).status_code == 201
                response = await client.get("/probes")
                assert response.json() == {"count": 1}, response.text

            async with session_manager.session() as db:
                db.add(Probe(label="from-batch"))
            assert await count_committed() == 2
        finally:
            async with session_manager.engine.begin() as connection:
                await connection.run_sync(Base.metadata.drop_all)
    finally:
        await session_manager.close()


asyncio.run(main())
print("extraction ok")
"""

NO_FASTAPI_SCRIPT = """
import asyncio
import os
import sys

BLOCKED = {"fastapi", "starlette", "pytest", "_pytest"}


class Block:
    # Stands in for an environment where FastAPI and pytest were never installed:
    # a batch job, or a test runner other than pytest.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Block())

import database
import database.testing
from sqlalchemy import text

for name in sorted(BLOCKED):
    assert name not in sys.modules, f"importing the package imported {name}"


async def main() -> None:
    database.session_manager.init(url=os.environ["DATABASE_URL"])
    try:
        async with database.session_manager.session() as db:
            assert await db.scalar(text("SELECT 1")) == 1
        async with database.testing.isolated(database.session_manager):
            async with database.session_manager.session() as db:
                assert await db.scalar(text("SELECT 1")) == 1
    finally:
        await database.session_manager.close()


asyncio.run(main())

try:
    database.get_db
except ModuleNotFoundError as error:
    assert "fastapi" in str(error), error
else:
    raise AssertionError("get_db was available without fastapi")
for name in sorted(BLOCKED):
    assert name not in sys.modules, f"using the package imported {name}"
print("no-fastapi ok")
"""


@pytest.fixture(name="project")
def project_fixture(tmp_path: Path) -> Path:
    """A project directory holding a copy of `app/database/` as top-level `database`."""
    project = tmp_path / "project"
    shutil.copytree(
        REPO_ROOT / "app" / "database",
        project / "database",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return project


async def _run_script(project: Path, script: str, database_url: URL) -> Result:
    (project / "main.py").write_text(textwrap.dedent(script))
    # Only the project directory (the script's own) may be on the path, not the repo.
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    environment["DATABASE_URL"] = database_url.render_as_string(hide_password=False)
    # Unclosed connections and other warnings fail the script, as they fail the suite.
    return await run_python("-W", "error", "main.py", cwd=project, env=environment)


async def test_copied_package_serves_a_fastapi_app_and_batch_jobs(
    project: Path, database_url: URL
) -> None:
    """The copy alone runs routes on AsyncSessionDep and a batch session, both committing."""
    result = await _run_script(project, APP_SCRIPT, database_url)

    assert result.returncode == 0, result.stderr
    assert "extraction ok" in result.stdout


async def test_copied_package_works_without_fastapi_or_pytest(
    project: Path, database_url: URL
) -> None:
    """Without FastAPI or pytest the copy and its testing module work; only get_db needs FastAPI."""
    result = await _run_script(project, NO_FASTAPI_SCRIPT, database_url)

    assert result.returncode == 0, result.stderr
    assert "no-fastapi ok" in result.stdout


NO_ASYNCPG_SCRIPT = """
import asyncio
import sys


class Block:
    # A service on another database: asyncpg was never installed.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "asyncpg":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, Block())

import database
from sqlalchemy import text


async def main() -> None:
    database.session_manager.init(url="sqlite+aiosqlite://")
    try:
        async with database.session_manager.session() as db:
            assert await db.scalar(text("SELECT 1")) == 1
    finally:
        await database.session_manager.close()


asyncio.run(main())
assert "asyncpg" not in sys.modules, "using the package imported asyncpg"
print("no-asyncpg ok")
"""


async def test_copied_package_works_without_asyncpg(project: Path, database_url: URL) -> None:
    """On another driver the copy never imports asyncpg: its asyncpg extras load lazily."""
    result = await _run_script(project, NO_ASYNCPG_SCRIPT, database_url)

    assert result.returncode == 0, result.stderr
    assert "no-asyncpg ok" in result.stdout
