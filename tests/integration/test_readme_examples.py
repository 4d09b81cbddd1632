"""Every Python example in the READMEs runs, against the test database.

Each block runs as its own program, with the example URL pointed at the test
database. A block that defines a FastAPI `app` has its lifespan run; a block
that defines a `router` is mounted and each of its GET routes must answer 200.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import URL

from app.database import DatabaseSessionManager
from tests.paths import REPO_ROOT
from tests.subprocesses import run_python

READMES = [REPO_ROOT / "README.md", REPO_ROOT / "app" / "database" / "README.md"]
EXAMPLE_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/app"
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)

DRIVER = """

async def _drive_example() -> None:
    import httpx
    from fastapi import FastAPI
    from app.database import session_manager

    example = globals()
    if isinstance(example.get("app"), FastAPI):
        app = example["app"]
        async with app.router.lifespan_context(app):
            assert "open" in repr(session_manager), "the lifespan did not init()"
        assert "closed" in repr(session_manager), "the lifespan did not close()"
    if "router" in example:
        host = FastAPI()
        host.include_router(example["router"])
        session_manager.init(url=EXAMPLE_URL)
        try:
            transport = httpx.ASGITransport(app=host)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
                for route in example["router"].routes:
                    if "GET" in route.methods and "{" not in route.path:
                        response = await client.get(route.path)
                        assert response.status_code == 200, (route.path, response.text)
        finally:
            await session_manager.close()


import asyncio as _asyncio

_asyncio.run(_drive_example())
"""


def _examples() -> list[tuple[str, str]]:
    found = []
    for readme in READMES:
        for number, match in enumerate(PYTHON_BLOCK.finditer(readme.read_text()), start=1):
            found.append((f"{readme.relative_to(REPO_ROOT)}#{number}", match.group(1)))
    return found


EXAMPLES = _examples()


def test_the_package_readme_has_examples() -> None:
    """The lifespan, route and batch examples are all found, so none goes untested."""
    assert len([name for name, _ in EXAMPLES if name.startswith("app/")]) >= 3


async def _run_example(code: str, database_url: URL, tmp_path: Path) -> None:
    test_url = database_url.render_as_string(hide_password=False)
    program = code.replace(EXAMPLE_URL, test_url)
    program += f"\nEXAMPLE_URL = {test_url!r}\n" + DRIVER
    script = tmp_path / "example.py"
    script.write_text(program)
    # The examples import `app.database` as an installed package would be imported.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    result = await run_python(str(script), cwd=REPO_ROOT, env=env)

    assert result.returncode == 0, f"example failed:\n{code}\n{result.output}"


@pytest.mark.parametrize(("name", "code"), EXAMPLES, ids=[name for name, _ in EXAMPLES])
async def test_readme_example_runs(
    name: str,
    code: str,
    committed_db: DatabaseSessionManager,
    database_url: URL,
    tmp_path: Path,
) -> None:
    """The example runs to completion as a program of its own."""
    await _run_example(code, database_url, tmp_path)


async def test_batch_example_commits_without_calling_commit(
    committed_db: DatabaseSessionManager,
    database_url: URL,
    observer: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """The package README's batch example really commits its write."""
    batch = next(code for _, code in EXAMPLES if "from-a-batch-job" in code)

    await _run_example(batch, database_url, tmp_path)

    query = "SELECT count(*) FROM items WHERE name = 'from-a-batch-job'"
    assert await observer.fetchval(query) == 1
