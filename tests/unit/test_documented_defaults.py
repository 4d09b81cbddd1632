"""The package README's "Defaults" table is the code's: same values, nothing missing.

A default changed in the code and not in the table fails here, and so does a new
numeric constant, engine option, connect argument or public keyword default
(a number, a string or a flag) that the table does not list. The rows for what
stays off until a call turns it on (telemetry, the slow-unit log) are checked in
a fresh interpreter.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import pkgutil
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import make_url

import app.database
from app.database import DatabaseSessionManager, ReadYourWritesMiddleware, retrying_route_class
from app.database._config import engine_options
from tests.paths import REPO_ROOT
from tests.subprocesses import run_python

README = Path(app.database.__file__).with_name("README.md")
ASYNCPG = make_url("postgresql+asyncpg://app@db.example/app")
PSYCOPG = make_url("postgresql+psycopg://app@db.example/app")
SQLITE = make_url("sqlite+aiosqlite:///demo.sqlite3")

# `module.NAME` or `module.NAME["key"]`, relative to app.database.
CONSTANT = re.compile(r'^(?P<module>[\w.]+)\.(?P<name>_?[A-Z][A-Z0-9_]*)(?:\["(?P<key>\w+)"\])?$')

# Numeric constants that are facts or markers, not choices a user might change.
NOT_DEFAULTS = {
    "_wal_position.UNKNOWN_POSITION": "a marker for a position never read",
    "_wal_position._WAL_PAGE": "PostgreSQL's WAL page size",
    "drivers._psycopg._MIN_CONNECT_TIMEOUT": "libpq's floor for connect_timeout",
    "_classify.SQLSTATE_LENGTH": "the length of every SQLSTATE",
    "_session_statements._SET_CONFIG_ARGUMENTS": "set_config()'s arity",
}

# Public keyword defaults, and the row documenting each.
PUBLIC_DEFAULTS = {
    "DatabaseSessionManager.init(max_replica_lag)": "`max_replica_lag`",
    "DatabaseSessionManager.close(grace)": "`close(grace=)`",
    "DatabaseSessionManager.run_in_transaction(attempts)": "`attempts`",
    "ReadYourWritesMiddleware.__init__(cookie_name)": "`cookie_name`",
    "retrying_route_class(attempts)": "`attempts`",
    "DatabaseSessionManager.init(transaction_pooler)": "`transaction_pooler`",
    "DatabaseSessionManager.session(read_only)": "`read_only`",
    "DatabaseSessionManager.session(deferrable)": "`deferrable`",
    "DatabaseSessionManager.run_in_transaction(read_only)": "`read_only`",
    "DatabaseSessionManager.run_in_transaction(deferrable)": "`deferrable`",
    "enable_telemetry(enable_commenter)": "`enable_commenter`",
}

# Rows for what stays off until a call turns it on, and the call.
OFF_UNTIL_CALLED = {
    "telemetry: traces and metrics": "enable_telemetry",
    "slow-unit log threshold": "log_slow_units",
}

# A fresh interpreter: the package imported and a unit of work run, nothing turned
# on. Prints the hooks that have listeners and the instrumentation if it was loaded.
NOTHING_TURNED_ON = textwrap.dedent(
    """
    import asyncio, sys
    from sqlalchemy import text
    from app.database import DatabaseSessionManager, _signals, _slow_units

    async def main():
        manager = DatabaseSessionManager()
        manager.init("sqlite+aiosqlite:///:memory:")
        async with manager.session() as db:
            await db.execute(text("SELECT 1"))
        await manager.close()

    asyncio.run(main())
    hooks = [v.name for v in vars(_signals).values() if isinstance(v, _signals.Hook) and v]
    print("listening:", hooks)
    print("instrumentation loaded:", "opentelemetry.instrumentation.sqlalchemy" in sys.modules)
    print("slow-unit threshold:", _slow_units._Threshold.seconds)
    """
)


@dataclass(frozen=True)
class Row:
    value: Any
    code: str


def _first_code(cell: str) -> str:
    found = re.search(r"`([^`]*)`", cell)
    assert found, f"no `code` in {cell!r}"
    return found.group(1)


def documented() -> dict[str, Row]:
    """The Defaults table: setting -> (the default as a Python value, where it lives)."""
    section = README.read_text().split("\n## Defaults\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| setting | default |"), lines[0]
    rows: dict[str, Row] = {}
    for line in lines[2:]:  # past the header and its rule
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        assert len(cells) == 5, f"expected 5 cells: {line}"
        setting = cells[0]
        assert setting not in rows, f"listed twice: {setting}"
        rows[setting] = Row(ast.literal_eval(_first_code(cells[1])), _first_code(cells[4]))
    return rows


def resolve(reference: str) -> Any:
    """The value a `module.NAME["key"]` reference names; a function gives what it returns."""
    match = CONSTANT.match(reference)
    assert match, reference
    value = getattr(importlib.import_module(f"app.database.{match['module']}"), match["name"])
    if match["key"]:
        value = value[match["key"]]
    return value() if callable(value) else value


def applied() -> dict[str, Any]:
    """What engine_options() sets when nothing is passed, by the table's setting names."""
    values: dict[str, Any] = {}
    for url in (ASYNCPG, PSYCOPG, SQLITE):
        for pooler in (False, True) if url is not SQLITE else (False,):
            options = engine_options({}, url, transaction_pooler=pooler)
            driver = url.get_dialect().driver
            for name, value in options.pop("connect_args", {}).items():
                if name != "async_creator_fn":  # psycopg's bounded connections
                    values[f'{driver} `connect_args["{name}"]`'] = (
                        value() if callable(value) else value
                    )
            # build_engine turns pre-ping off for asyncpg and psycopg (their own check).
            if driver != "aiosqlite":
                options.pop("pool_pre_ping")
            values.update({f"`{name}`": value for name, value in options.items()})
    return values


def test_each_documented_default_is_the_codes() -> None:
    """Every row naming a constant holds its value."""
    rows = documented()
    checked = {setting: row for setting, row in rows.items() if CONSTANT.match(row.code)}

    assert {setting: row.value for setting, row in checked.items()} == {
        setting: resolve(row.code) for setting, row in checked.items()
    }


def test_what_init_applies_is_documented() -> None:
    """Every engine option and connect argument the package adds is a row, with its value."""
    rows = documented()
    live = applied()

    assert {setting: rows[setting].value for setting in live if setting in rows} == live
    assert set(live) <= set(rows), f"not in the Defaults table: {sorted(set(live) - set(rows))}"


def test_a_row_without_a_constant_is_checked_by_what_init_applies() -> None:
    """Rows that name no constant are pinned another way: by what init() applies
    (psycopg's prepare_threshold), as a keyword default, or as off until called."""
    rows = documented()
    unpinned = {s for s, row in rows.items() if not CONSTANT.match(row.code)} - set(applied())
    unpinned -= set(PUBLIC_DEFAULTS.values()) | set(OFF_UNTIL_CALLED)

    assert not unpinned, f"neither a constant nor applied by init(): {sorted(unpinned)}"


def _numeric_constants() -> set[str]:
    """`module.NAME` of each int or float constant defined at the top of a package module."""
    found = set()
    for info in pkgutil.walk_packages(app.database.__path__, "app.database."):
        module = importlib.import_module(info.name)
        for node in ast.parse(Path(str(module.__file__)).read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            if isinstance(node, ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if not isinstance(target, ast.Name) or not target.id.lstrip("_").isupper():
                    continue
                value = getattr(module, target.id)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    found.add(f"{info.name.removeprefix('app.database.')}.{target.id}")
    return found


def test_every_numeric_constant_is_documented() -> None:
    """A new timeout or limit anywhere in the package needs its row (or a reason here)."""
    referenced = {CONSTANT.sub(r"\g<module>.\g<name>", row.code) for row in documented().values()}

    missing = _numeric_constants() - referenced - set(NOT_DEFAULTS)

    assert not missing, f"not in the Defaults table: {sorted(missing)}"


def _public_defaults() -> dict[str, Any]:
    """Number, string and bool keyword defaults of the public API, by `callable(parameter)`."""
    callables: dict[str, Any] = {
        "retrying_route_class": retrying_route_class,
        "enable_telemetry": app.database.enable_telemetry,
    }
    for cls in (DatabaseSessionManager, ReadYourWritesMiddleware):
        for name, member in vars(cls).items():
            if callable(member) and (name == "__init__" or not name.startswith("_")):
                callables[f"{cls.__name__}.{name}"] = member
    defaults = {}
    for qualified, function in callables.items():
        for parameter in inspect.signature(function).parameters.values():
            value = parameter.default
            if isinstance(value, int | float | str):  # bool is an int
                defaults[f"{qualified}({parameter.name})"] = value
    return defaults


def test_public_keyword_defaults_are_documented() -> None:
    """A keyword default of the public API is a row, with the same value."""
    rows = documented()
    public = _public_defaults()

    assert set(public) == set(PUBLIC_DEFAULTS), "update PUBLIC_DEFAULTS and the README's table"
    assert {name: rows[PUBLIC_DEFAULTS[name]].value for name in public} == public


async def test_observability_is_off_until_turned_on() -> None:
    """The rows that say "off until called": a unit of work runs and nothing listens."""
    rows = documented()
    assert {setting: rows[setting].value for setting in OFF_UNTIL_CALLED} == {
        "telemetry: traces and metrics": False,
        "slow-unit log threshold": None,
    }
    assert [rows[s].code.rpartition(".")[2] for s in OFF_UNTIL_CALLED] == list(
        OFF_UNTIL_CALLED.values()
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    result = await run_python("-c", NOTHING_TURNED_ON, cwd=REPO_ROOT, env=env)

    assert result.returncode == 0, result.output
    assert "listening: []" in result.stdout, result.stdout
    assert "instrumentation loaded: False" in result.stdout, result.stdout
    assert "slow-unit threshold: None" in result.stdout, result.stdout
