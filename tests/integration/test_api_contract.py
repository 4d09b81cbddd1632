"""The reference service answers what its OpenAPI schema says, and nothing else.

The main test runs Schemathesis (every phase, stateful included, every check) against
the service under uvicorn on this worker's PostgreSQL database; the others pin each
fix it needed on its own, so a regression names its cause.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import text
from sqlalchemy.engine import URL

from app.database import DatabaseSessionManager
from app.main import create_app
from app.schemas import STRIPPED, ItemCreate, ItemRead, ItemUpdate
from tests.faults.service import running_service

# Cases per operation and phase: 25 found each of the 9 failures the service had
# before its schema was fixed, as 50 did. Derandomized, the run is the same every
# time on an empty database: 309 test cases, 8-9 s of CPU for Schemathesis.
MAX_EXAMPLES = 25
SCHEMATHESIS_TIMEOUT_SECONDS = 90.0


@pytest.fixture(name="openapi", scope="module")
def openapi_fixture() -> dict[str, Any]:
    schema: dict[str, Any] = create_app().openapi()
    return schema


async def test_schemathesis_finds_nothing(
    committed_db: DatabaseSessionManager, database_url: URL, tmp_path: Path
) -> None:
    """No server error, undocumented status or header, or schema mismatch, in any phase."""
    async with committed_db.engine.begin() as connection:
        # Rolled-back tests still advanced the id sequence: from id 1, the stateful
        # phase (which follows the ids the service returns) is the same on every run.
        await connection.execute(text("TRUNCATE items RESTART IDENTITY"))
    report_path = tmp_path / "report.json"
    async with running_service(database_url) as service:
        command = [
            *(sys.executable, "-m", "schemathesis.cli", "--no-color", "run"),
            f"{service.base_url}/openapi.json",
            *("--checks", "all", "--workers", "1", "--max-examples", str(MAX_EXAMPLES)),
            # Hypothesis derandomized: the same cases on every run, and no example
            # database carrying cases from one run to the next.
            "--generation-deterministic",
            *("--report", "json", "--report-json-path", str(report_path)),
        ]
        # In tmp_path: Schemathesis and Hypothesis write directories of their own
        # into the working directory. UTF-8: the output has emoji, which a C locale
        # could not print.
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=tmp_path,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            stdout, _ = await asyncio.wait_for(process.communicate(), SCHEMATHESIS_TIMEOUT_SECONDS)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    output = stdout.decode(errors="replace")
    assert report_path.exists(), output
    report = json.loads(report_path.read_text())

    assert (report["failures"], report["errors"]) == ([], []), output
    # A warning means part of the schema went untested (a pattern it could not
    # use, operations it could not reach).
    assert not {name: found for name, found in report["warnings"].items() if found}, output
    # No examples in the schema, so that phase has nothing to run; the others all ran.
    phases = {name: phase["status"] for name, phase in report["phases"].items()}
    assert phases == {
        "examples": "skip",
        "coverage": "success",
        "fuzzing": "success",
        "stateful": "success",
    }, output
    assert report["exit_code"] == 0, output


# Every status each route can answer; 503 and 504 come from the database.
EXPECTED_STATUSES = {
    ("get", "/items"): {"200", "422", "503", "504"},
    ("post", "/items"): {"201", "400", "409", "422", "503", "504"},
    ("get", "/items/{item_id}"): {"200", "404", "422", "503", "504"},
    ("patch", "/items/{item_id}"): {"200", "400", "404", "409", "422", "503", "504"},
    ("delete", "/items/{item_id}"): {"204", "404", "422", "503", "504"},
}


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED_STATUSES))
def test_each_item_route_documents_every_status_it_answers(
    openapi: dict[str, Any], method: str, path: str
) -> None:
    """404, 409, 400 where the route can give them, 503 and 504 everywhere, with bodies."""
    responses = openapi["paths"][path][method]["responses"]

    assert set(responses) == EXPECTED_STATUSES[method, path]
    for status in set(responses) - {"200", "201", "204", "422"}:
        content = responses[status]["content"]["application/json"]
        assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, status


@pytest.mark.parametrize("path", ["/health", "/health/migrations"])
def test_the_health_routes_document_their_503(openapi: dict[str, Any], path: str) -> None:
    """A probe's failure answer is part of its contract, body schema included."""
    responses = openapi["paths"][path]["get"]["responses"]
    assert set(responses) == {"200", "503"}
    assert responses["503"]["content"]["application/json"]["schema"]
    assert responses["200"]["content"]["application/json"]["schema"]


def test_503_documents_retry_after(openapi: dict[str, Any]) -> None:
    """Retry-After is documented, optional: a lost COMMIT's 503 has none."""
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/items"):
                header = operation["responses"]["503"]["headers"]["Retry-After"]
                assert header["schema"]["type"] == "integer", (method, path)
                assert not header.get("required", False), (method, path)


def test_error_body_schema_is_the_handlers_body(openapi: dict[str, Any]) -> None:
    """ErrorBody: an object with a string `detail`, as 404, 409 and the database errors give."""
    schema = openapi["components"]["schemas"]["ErrorBody"]

    assert schema["required"] == ["detail"]
    assert schema["properties"]["detail"]["type"] == "string"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", "/items/1", "DELETE, GET, PATCH"),
        ("OPTIONS", "/items/1", "DELETE, GET, PATCH"),
        ("DELETE", "/items", "GET, POST"),
        ("POST", "/health", "GET"),
    ],
)
async def test_405_allows_every_method_of_the_path(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    """Allow names every route's methods on that path, not only the first route's."""
    response = await client.request(method, path)

    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json() == {"detail": "Method Not Allowed"}


def _admits_null(schema: dict[str, Any]) -> bool:
    return jsonschema_rs.validator_for(schema).is_valid(None)


def test_patch_schema_refuses_a_null_name(openapi: dict[str, Any]) -> None:
    """The server refuses `{"name": null}` (422), so the schema does not offer null."""
    properties = openapi["components"]["schemas"]["ItemUpdate"]["properties"]

    assert not _admits_null(properties["name"])
    assert _admits_null(properties["description"])  # null clears the description
    # Neither has a default: a field left out keeps the item's value.
    assert "default" not in properties["name"]
    assert "default" not in properties["description"]


LONGEST_NAME = "n" * 100
LONGEST_DESCRIPTION = "d" * 1000
# Text around the limits, whitespace the server strips (or does not: U+001C, U+FEFF,
# U+200B are no Unicode White_Space) and NUL.
TEXTS = [
    "",
    " ",
    "\u3000\t",
    "a",
    " a ",
    "\x1c",
    "\ufeff",
    "\u200b",
    "a b",
    "a\x00",
    " \x00 ",
    LONGEST_NAME,
    LONGEST_NAME + "n",
    f" {LONGEST_NAME}\u2028",
    f" {LONGEST_NAME}n ",
    LONGEST_DESCRIPTION,
    LONGEST_DESCRIPTION + "d",
    f"\n{LONGEST_DESCRIPTION}\xa0",
    f"\n{LONGEST_DESCRIPTION}d\xa0",
]


def _accepted_by_server(model: type[ItemCreate | ItemUpdate], body: dict[str, Any]) -> bool:
    # FastAPI validates a body with exactly this model.
    try:
        model.model_validate(body)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(
    ("model", "field", "other"),
    [
        (ItemCreate, "name", {}),
        (ItemCreate, "description", {"name": "n"}),
        (ItemUpdate, "name", {}),
        (ItemUpdate, "description", {}),
    ],
)
def test_text_fields_schema_accepts_what_the_server_accepts(
    openapi: dict[str, Any],
    model: type[ItemCreate | ItemUpdate],
    field: str,
    other: dict[str, str],
    text: str,
) -> None:
    """The server strips whitespace before its length checks: the schema allows for it."""
    body = {**other, field: text}
    schema = jsonschema_rs.validator_for(openapi["components"]["schemas"][model.__name__])

    assert schema.is_valid(body) == _accepted_by_server(model, body)


def test_the_schemas_whitespace_is_what_pydantic_strips() -> None:
    """STRIPPED names exactly the characters pydantic strips, over all of Unicode."""
    stripping = TypeAdapter(list[str], config={"str_strip_whitespace": True})
    characters = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    stripped = stripping.validate_python([f"{c}." for c in characters])
    in_class = re.compile(f"[{STRIPPED}]")

    mismatched = [
        hex(ord(c))
        for c, kept in zip(characters, stripped, strict=True)
        if (kept == ".") != bool(in_class.fullmatch(c))
    ]
    assert mismatched == []


def test_a_creation_time_without_zone_is_answered_in_utc(openapi: dict[str, Any]) -> None:
    """SQLite (the demo) returns created_at without a zone, which is no RFC 3339 date-time."""
    stored = datetime(2026, 1, 2, 3, 4, 5)  # what SQLite's CURRENT_TIMESTAMP gives: UTC
    item = ItemRead(id=1, name="n", description=None, created_at=stored)
    body = json.loads(item.model_dump_json())
    schema = openapi["components"]["schemas"]["ItemRead"]

    assert jsonschema_rs.validator_for(schema, validate_formats=True).is_valid(body)
    assert body["created_at"] == "2026-01-02T03:04:05Z"


async def test_the_service_serves_through_uvloop_and_httptools(database_url: URL) -> None:
    """uvicorn's defaults (--loop auto --http auto) pick uvicorn[standard]'s speed-ups.

    `make demo` starts uvicorn the same way; the modules a process has loaded are
    what it uses, as uvicorn imports each only when it picks it.
    """
    async with running_service(database_url) as service:
        mapped = _mapped_files(service.process.pid)

    assert any("/uvloop/" in path for path in mapped), mapped
    assert any("/httptools/" in path for path in mapped), mapped


def _mapped_files(pid: int) -> set[str]:
    """The files process `pid` has mapped: its shared libraries and extension modules."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    # address, permissions, offset, device, inode, then the path (if any).
    return {fields[5] for fields in (line.split(maxsplit=5) for line in lines) if len(fields) == 6}
