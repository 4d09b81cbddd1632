"""Drop-in adoption: the package copied into a service written the way existing ones are.

host_project/ is that service (its own settings, DeclarativeBase and constraint
names, an Alembic env.py in each common style, a module-level app, strict ruff
and mypy settings). Each test copies it and the package folder, as
`shop/core/database`, into a directory of its own, and runs the host's tools
there, in fresh processes: its test suite with the plugin enabled by one line,
serially and under xdist, and its linters on the copied folder.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import URL

from app.database.testing import create_test_database, drop_test_database
from tests.drivers import DRIVER, DRIVERS
from tests.paths import REPO_ROOT
from tests.postgres import asyncpg_dsn
from tests.subprocesses import Result, run_python

HOST_TEMPLATE = Path(__file__).with_name("host_project")
PACKAGE = REPO_ROOT / "app" / "database"
COPIED_TO = Path("shop", "core", "database")
PLUGIN = "shop.core.database.testing.pytest_plugin"
HOST_TESTS = 6  # in host_project/tests/test_users.py


@dataclass(frozen=True)
class Host:
    """A copy of the host service with the package in it, and its commands."""

    root: Path
    env: dict[str, str]
    settings_url: URL  # the service's own database, per its settings

    def use_env_py(self, style: str) -> None:
        shutil.copy(
            self.root / "alembic" / "env_styles" / f"{style}.py", self.root / "alembic" / "env.py"
        )

    async def python(self, *args: str) -> Result:
        return await run_python(*args, cwd=self.root, env=self.env)

    async def pytest(self, *args: str) -> Result:
        # pytest-alembic registers itself on install and breaks collection on pytest
        # 9 (this repository's pyproject.toml says why); the host has no use for it.
        return await self.python(
            "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:pytest_alembic", *args
        )

    async def tool(self, name: str, *args: str) -> Result:
        return await self.python("-m", name, *args)


@pytest.fixture(name="driver")
def driver_fixture() -> str:
    """The driver the host's settings name: the one under test (TEST_DRIVER)."""
    return DRIVER


@pytest.fixture(name="host")
async def host_fixture(tmp_path: Path, database_url: URL, driver: str) -> AsyncIterator[Host]:
    """The host, its databases named after this test; none may be left behind."""
    root = tmp_path / "shop_service"
    unwanted = shutil.ignore_patterns("__pycache__", ".mypy_cache", ".ruff_cache")
    shutil.copytree(HOST_TEMPLATE, root, ignore=unwanted)
    shutil.copytree(PACKAGE, root / COPIED_TO, ignore=unwanted)
    base = f"adopt_{os.getpid()}_{zlib.crc32(str(tmp_path).encode()):08x}"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"TEST_DATABASE_URL", "PYTHONPATH"}
    }
    # The host's settings name the server; its conftest hands them to the plugin.
    settings_url = database_url.set(drivername=f"postgresql+{driver}", database=base)
    env["SHOP_DATABASE_URL"] = settings_url.render_as_string(hide_password=False)
    yield Host(root, env, settings_url)
    observer = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        left = await observer.fetchval(
            "SELECT count(*) FROM pg_database WHERE starts_with(datname, $1)", base
        )
    finally:
        await observer.close()
    assert left == 0, f"{left} test database(s) of the host's runs left behind"


def _passed(result: Result, count: int) -> bool:
    return result.returncode == 0 and f"{count} passed" in result.stdout


@pytest.mark.parametrize("style", ["async_template", "threadsafe", "attributes"])
async def test_the_host_suite_passes_with_its_own_env_py(host: Host, style: str) -> None:
    """Alembic runs the host's env.py unchanged, in each common style, on the test database."""
    host.use_env_py(style)

    result = await host.pytest()

    assert _passed(result, HOST_TESTS), result.output


async def test_the_host_suite_passes_under_xdist(host: Host) -> None:
    """Two workers, each on its own database, with the env.py that waits on a running loop."""
    host.use_env_py("threadsafe")

    # loadfile: the host's tests check, in order, what the previous one left.
    result = await host.pytest("-n", "2", "--dist", "loadfile")

    assert _passed(result, HOST_TESTS), result.output


async def test_a_commit_outside_the_isolation_is_reported(host: Host) -> None:
    """A row committed through the engine fails the run, the models being on the host's Base."""
    host.use_env_py("async_template")

    result = await host.pytest("tests/leak_commits.py")

    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.output
    assert "rows persisted past the rollback isolation: {'shop_user': 1}" in result.stdout, (
        result.output
    )


# On both drivers, whatever TEST_DRIVER says (`make test` runs this tier on asyncpg
# only): psycopg reports the missing database with no SQLSTATE, asyncpg with one.
@pytest.mark.parametrize("driver", DRIVERS)
async def test_an_env_py_that_ignores_the_test_database_stops_the_run_naming_the_fix(
    host: Host,
) -> None:
    """An env.py that connects where its settings say is caught, not left to migrate elsewhere."""
    host.use_env_py("settings_only")
    # The server trusts every login; the password is there to be kept out of the report.
    password = "sh0w-n0-PASSWORD"
    with_password = host.settings_url.set(password=password)
    host.env["SHOP_DATABASE_URL"] = with_password.render_as_string(hide_password=False)

    result = await host.pytest()

    assert result.returncode != 0, result.output
    assert "alembic upgrade head failed" in result.stdout, result.output
    assert 'URL from config.get_main_option("sqlalchemy.url")' in result.stdout, result.output
    assert "does not exist" in result.stdout, result.output  # the database env.py wanted
    assert "Traceback" in result.stdout, result.output
    assert password not in result.output


async def test_an_env_py_that_sets_its_own_url_is_stopped_before_it_migrates_it(
    host: Host,
) -> None:
    """The developer's database that the service's settings name is left untouched."""
    host.use_env_py("sets_url_from_settings")
    await create_test_database(host.settings_url)
    try:
        result = await host.pytest()
        developer = await asyncpg.connect(asyncpg_dsn(host.settings_url))
        try:
            tables = await developer.fetchval(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
            )
        finally:
            await developer.close()
    finally:
        await drop_test_database(host.settings_url)

    assert tables == 0, "env.py migrated the database its settings name"
    assert result.returncode != 0, result.output
    assert "env.py set sqlalchemy.url to" in result.stdout, result.output
    assert 'config.get_main_option("sqlalchemy.url")' in result.stdout, result.output


async def test_a_migration_that_never_ends_stops_the_run_at_the_timeout(host: Host) -> None:
    """An env.py that waits forever fails the run after database_migrate_timeout, not never."""
    (host.root / "alembic" / "env.py").write_text("import time\n\ntime.sleep(3600)\n")

    result = await host.pytest("-o", "database_migrate_timeout=1")

    assert result.returncode != 0, result.output
    assert "did not finish in 1 s" in result.stdout, result.output
    assert "raise database_migrate_timeout" in result.stdout, result.output


async def test_plugin_messages_name_the_module_where_the_host_put_it(host: Host) -> None:
    """A refused setting names the plugin by the path the host imports it from."""
    result = await host.pytest("-o", "asyncio_default_test_loop_scope=function")

    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.output
    assert f"{PLUGIN} shares one engine" in result.stderr, result.output


async def test_the_host_linters_accept_the_copied_folder(host: Host) -> None:
    """The host's ruff (its config, or forced over the folder's) and mypy --strict pass on it."""
    folder = str(COPIED_TO)
    # As the host's pre-commit hooks run them: the folder's ruff.toml applies to it.
    checks = {
        "ruff check": await host.tool("ruff", "check", "--no-cache", "."),
        "ruff format": await host.tool("ruff", "format", "--no-cache", "--check", "."),
        # The host's own rules (pylint's PL included) forced onto the folder.
        "ruff check, host config": await host.tool(
            "ruff", "check", "--no-cache", "--config", "pyproject.toml", folder
        ),
        "ruff check, host config, E501 at 100": await host.tool(
            "ruff",
            "check",
            "--no-cache",
            "--config",
            "pyproject.toml",
            "--line-length",
            "100",
            "--extend-select",
            "E501",
            folder,
        ),
        # No stubs for asyncpg, and none of this repository's mypy overrides.
        "mypy --strict": await host.tool("mypy", "--strict", "--no-incremental", "shop"),
    }

    failed = {name: result.output for name, result in checks.items() if result.returncode != 0}
    assert not failed, failed
