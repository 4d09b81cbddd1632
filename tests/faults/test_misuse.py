"""Misuse and bad input get a clear error that names the fix, and the password shows nowhere.

Scenarios M-01 to M-07 and S of the reliability matrix, against the private fault
cluster, whose `app` role checks its password (the canary) with scram-sha-256.
Every case scans every output channel for the canary (`tests/faults/canary.py`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import exc, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

import app.database._fastapi
from app.database import (
    AsyncSessionDep,
    DatabaseAlreadyInitializedError,
    DatabaseConfigError,
    DatabaseNotInitializedError,
    DatabaseSessionManager,
)
from app.database.drivers import CONNECT_TIMEOUT_SECONDS
from tests.drivers import DRIVER, application_name
from tests.faults.canary import assert_no_canary, canary_forms, canary_hits, exception_channels
from tests.faults.proxy import FaultProxy
from tests.faults.server import APP_ROLE, CANARY_PASSWORD, DATABASE, FaultServer, free_port
from tests.faults.service import running_service
from tests.postgres import count_backends

# Everything that logs on these paths, at DEBUG: the matrix's list of sinks.
LOGGERS = ("sqlalchemy.engine", "sqlalchemy.pool", "asyncpg", "psycopg", "uvicorn", "app.database")
# Contains the canary, so a leak of the wrong password is a canary hit too.
WRONG_PASSWORD = "wrong-" + CANARY_PASSWORD
OTHER_ROLE = "misuse_other"
INIT_HINT = (
    "DatabaseSessionManager is not initialised: call `session_manager.init(url=...)` at "
    "start-up, for example in your FastAPI lifespan, before using the database"
)
CLOSED_HINT = (
    "DatabaseSessionManager is closed: `close()` was called, so no new sessions can start; "
    "call `session_manager.init(url=...)` to reopen it"
)
ALREADY_HINT = (
    "DatabaseSessionManager is already initialised: call "
    "`await session_manager.close()` before calling `init()` again"
)
# A generous bound: backends exit a moment after their client's goodbye.
BACKEND_EXIT_SECONDS = 10.0


def _url_string(url: URL) -> str:
    """`url` as the string a deployment's DATABASE_URL would hold, password encoded."""
    return url.render_as_string(hide_password=False)


@dataclass
class Sinks:
    """The channels a test cannot name up front: logs, fds, warnings, the server's log."""

    caplog: pytest.LogCaptureFixture
    capfd: pytest.CaptureFixture[str]
    recwarn: pytest.WarningsRecorder
    server_log: Path
    server_log_start: int
    application_name: str

    def assert_clean(self, channels: dict[str, str]) -> None:
        """No canary in `channels` or in any sink so far, and no warning at all."""
        stdout, stderr = self.capfd.readouterr()
        with self.server_log.open(errors="replace") as log:
            log.seek(self.server_log_start)
            server_log = log.read()
        warned = "\n".join(f"{w.category.__name__}: {w.message}" for w in self.recwarn)
        assert_no_canary(
            {
                "log records": self.caplog.text,
                "stdout": stdout,
                "stderr": stderr,
                "warnings": warned,
                "server log": server_log,
                **channels,
            }
        )
        assert not self.recwarn.list, f"warnings were emitted:\n{warned}"

    def engine_options(self) -> dict[str, Any]:
        """Echo everything, under logger names and an application name of this test's own."""
        return {
            "echo": True,
            "echo_pool": "debug",
            # SQLAlchemy gives an echoing logger a handler bound to this test's
            # captured stdout: a name of its own keeps it away from later tests.
            "logging_name": self.application_name,
            "pool_logging_name": self.application_name,
            "connect_args": application_name(self.application_name),
        }


@pytest.fixture(name="sinks")
def sinks_fixture(
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
    fault_server: FaultServer,
) -> Sinks:
    """Every logger of the matrix at DEBUG, captured fds and warnings, from here on."""
    # recwarn records warnings instead of raising them (filterwarnings = error), so
    # one raised inside a driver's error handling cannot be swallowed there unseen;
    # assert_clean fails on any.
    caplog.set_level(logging.DEBUG)
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return Sinks(
        caplog,
        capfd,
        recwarn,
        fault_server.log,
        fault_server.log.stat().st_size,
        f"misuse-{uuid.uuid4().hex[:12]}",
    )


@pytest.fixture(name="other_role", scope="module")
def other_role_fixture(fault_server: FaultServer) -> Iterator[str]:
    """A role that exists, with a password that is not the canary."""
    fault_server.psql(f"CREATE ROLE {OTHER_ROLE} LOGIN PASSWORD 'other-role-password'")
    yield OTHER_ROLE
    fault_server.psql(f"DROP ROLE {OTHER_ROLE}")


async def _backends(server: FaultServer, application_name: str) -> int:
    """How many backends the server has for `application_name` right now."""
    # A connection of its own each time: tests elsewhere may restart the server.
    observer = await asyncpg.connect(server.superuser_dsn())
    try:
        return await count_backends(observer, application_name)
    finally:
        await observer.close()


async def _no_backends_left(server: FaultServer, application_name: str) -> int:
    """Wait (bounded) for `application_name`'s backends to exit; returns how many remain."""
    deadline = time.monotonic() + BACKEND_EXIT_SECONDS
    count = await _backends(server, application_name)
    while count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        count = await _backends(server, application_name)
    return count


async def _open_one_connection(manager: DatabaseSessionManager) -> None:
    async with manager.session() as db:
        assert await db.scalar(text("SELECT 1")) == 1


def _live_engines() -> set[int]:
    gc.collect()
    return {id(thing) for thing in gc.get_objects() if isinstance(thing, AsyncEngine)}


def _manager_channels(manager: DatabaseSessionManager) -> dict[str, str]:
    channels = {"repr(manager)": repr(manager)}
    try:
        engine = manager.engine
    except DatabaseNotInitializedError:
        return channels  # new or closed: no engine to show
    return {**channels, "repr(engine)": repr(engine), "str(engine.url)": str(engine.url)}


def test_scanner_finds_every_spelling_and_names_the_channel() -> None:
    """Each form of the canary, even inside a URL, is a hit in its own channel only."""
    channels = {
        f"leaks {form}": f"url=x://u:{spelling}@h/db" for form, spelling in canary_forms().items()
    }
    channels["clean"] = "x://u:***@h/db"

    hits = canary_hits(channels)

    assert sorted(hits) == sorted(name for name in channels if name != "clean")
    for form in canary_forms():
        assert form in hits[f"leaks {form}"]
    with pytest.raises(AssertionError, match=re.escape("leaks raw: raw: ")):
        assert_no_canary(channels)


# --- M-01, M-04: sessions before init() and after close() ------------------------------


@pytest.mark.parametrize("state", ["new", "closed"])
async def test_session_outside_init_and_close_names_the_fix_and_connects_nothing(
    state: str, sinks: Sinks, fault_server: FaultServer
) -> None:
    """session() before init() or after close() is a typed error naming the fix; no backend."""
    manager = DatabaseSessionManager()
    hint = INIT_HINT
    if state == "closed":
        manager.init(url=_url_string(fault_server.app_url()), **sinks.engine_options())
        await _open_one_connection(manager)
        await manager.close()
        assert await _no_backends_left(fault_server, sinks.application_name) == 0
        hint = CLOSED_HINT

    with pytest.raises(DatabaseNotInitializedError, match=re.escape(hint)) as caught:
        async with manager.session():
            pass
    with pytest.raises(DatabaseNotInitializedError, match=re.escape(hint)):
        _ = manager.engine

    # The refusal reconnects nothing (a disposed engine would quietly open a new pool).
    assert await _backends(fault_server, sinks.application_name) == 0
    sinks.assert_clean({**exception_channels(caught.value), **_manager_channels(manager)})


def _tiny_app() -> FastAPI:
    tiny = FastAPI()

    @tiny.get("/one")
    async def one(db: AsyncSessionDep) -> int:
        return await db.scalar(text("SELECT 1")) or 0

    return tiny


@pytest.mark.parametrize("state", ["new", "closed"])
async def test_get_db_outside_init_and_close_fails_the_request_naming_the_fix(
    state: str, sinks: Sinks, fault_server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request through get_db before init() or after close() raises the typed error: a 500."""
    manager = DatabaseSessionManager()
    hint = INIT_HINT
    if state == "closed":
        manager.init(url=_url_string(fault_server.app_url()), **sinks.engine_options())
        await manager.close()
        hint = CLOSED_HINT
    # The plugin may hold the app's singleton open in this process: stand in this one.
    monkeypatch.setattr(app.database._fastapi, "session_manager", manager)
    tiny = _tiny_app()

    raising = httpx.ASGITransport(app=tiny)
    async with httpx.AsyncClient(transport=raising, base_url="http://test") as client:
        with pytest.raises(DatabaseNotInitializedError, match=re.escape(hint)) as caught:
            await client.get("/one")
    answering = httpx.ASGITransport(app=tiny, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=answering, base_url="http://test") as client:
        response = await client.get("/one")

    assert response.status_code == 500
    sinks.assert_clean(
        {
            "HTTP body": response.text,
            **exception_channels(caught.value),
            **_manager_channels(manager),
        }
    )


# --- M-02, M-03: init() twice, close() twice --------------------------------------------


async def _init_twice_in_sequence(init: Callable[[], None]) -> BaseException:
    init()
    with pytest.raises(DatabaseAlreadyInitializedError, match=re.escape(ALREADY_HINT)) as caught:
        init()
    return caught.value


async def _init_twice_at_once(init: Callable[[], None]) -> BaseException:
    # init() is synchronous: coroutines cannot interleave inside it, only around it.
    async def call() -> None:
        init()

    results = await asyncio.gather(call(), call(), return_exceptions=True)
    refused = [result for result in results if isinstance(result, BaseException)]
    assert results.count(None) == 1, results
    assert len(refused) == 1, results
    with pytest.raises(DatabaseAlreadyInitializedError, match=re.escape(ALREADY_HINT)):
        raise refused[0]
    return refused[0]


@pytest.mark.parametrize(
    "init_twice", [_init_twice_in_sequence, _init_twice_at_once], ids=["sequential", "gather"]
)
async def test_init_twice_is_refused_and_leaves_one_engine(
    init_twice: Callable[[Callable[[], None]], Any], sinks: Sinks, fault_server: FaultServer
) -> None:
    """A second init() says to close() first; after close() no engine or backend is left."""
    engines_before = _live_engines()
    manager = DatabaseSessionManager()
    url = _url_string(fault_server.app_url())

    error = await init_twice(lambda: manager.init(url=url, **sinks.engine_options()))
    try:
        await _open_one_connection(manager)
        assert await _backends(fault_server, sinks.application_name) == 1
        channels = {**exception_channels(error), **_manager_channels(manager)}
    finally:
        await manager.close()

    assert await _no_backends_left(fault_server, sinks.application_name) == 0
    assert _live_engines() - engines_before == set()
    sinks.assert_clean(channels)


async def test_close_before_init_and_twice_is_silent(
    sinks: Sinks, fault_server: FaultServer
) -> None:
    """close() before init() and a second close() raise nothing and warn nothing."""
    manager = DatabaseSessionManager()
    await manager.close()
    manager.init(url=_url_string(fault_server.app_url()), **sinks.engine_options())
    await _open_one_connection(manager)

    await manager.close()
    await manager.close()

    assert repr(manager) == "<DatabaseSessionManager closed>"
    assert await _no_backends_left(fault_server, sinks.application_name) == 0
    sinks.assert_clean(_manager_channels(manager))


# --- M-05, M-06: URLs and pool options init() refuses -------------------------------------

# {where} is the fault server's host, port and database; {password} the canary, escaped.
REFUSED_URLS = [
    pytest.param(
        f"postgresql+asyncpg://{APP_ROLE}:{CANARY_PASSWORD}@{{where}}",
        "database URL has more than one '@', which usually means the password contains "
        "unescaped special characters: percent-encode it "
        "(urllib.parse.quote(password, safe='')) or build the URL with "
        "sqlalchemy.URL.create(...)",
        id="password-not-escaped",
    ),
    pytest.param(
        f"postgresql+asyncpg://{APP_ROLE}@{{where}}?password={{password}}",
        "database URL carries a password in its query string, where it is shown in reprs "
        "and logs: put it in the user-info part or use sqlalchemy.URL.create(...)",
        id="password-in-query",
    ),
    pytest.param(
        f"postgresql+psycopg2://{APP_ROLE}:{{password}}@{{where}}",
        "driver 'psycopg2' is synchronous and cannot be used with asyncio: "
        "use 'postgresql+asyncpg://...'",
        id="sync-driver",
    ),
    pytest.param(
        f"postgresql://{APP_ROLE}:{{password}}@{{where}}",
        "database URL 'postgresql://...' does not name a driver, and the one SQLAlchemy "
        "would pick depends on its version (for PostgreSQL, the synchronous psycopg2 in "
        "2.0): use 'postgresql+asyncpg://...'",
        id="no-driver",
    ),
    pytest.param(
        f"postgresql+asyncpg://{APP_ROLE}:{{password}}@127.0.0.1:port/{DATABASE}",
        "database URL could not be parsed: expected a URL such as "
        "'postgresql+asyncpg://user:password@host:5432/dbname'",
        id="port-not-a-number",
    ),
]


@pytest.mark.parametrize(("template", "message"), REFUSED_URLS)
async def test_bad_url_is_refused_naming_the_fix_without_the_password(
    template: str, message: str, sinks: Sinks, fault_server: FaultServer
) -> None:
    """init() refuses the URL before creating anything, and says what to write instead."""
    manager = DatabaseSessionManager()
    url = template.format(
        where=f"127.0.0.1:{fault_server.port}/{DATABASE}",
        password=urllib.parse.quote(CANARY_PASSWORD, safe=""),
    )

    with pytest.raises(DatabaseConfigError, match=re.escape(message)) as caught:
        manager.init(url=url, **sinks.engine_options())

    assert repr(manager) == "<DatabaseSessionManager new>"
    assert await _backends(fault_server, sinks.application_name) == 0
    sinks.assert_clean({**exception_channels(caught.value), **_manager_channels(manager)})


POOL_HINT = (
    "0 would mean an unbounded pool; to disable pooling pass poolclass=sqlalchemy.pool.NullPool"
)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("pool_size", 0, f"pool_size must be an integer >= 1, got 0 ({POOL_HINT})"),
        ("pool_size", -1, f"pool_size must be an integer >= 1, got -1 ({POOL_HINT})"),
        ("pool_size", True, f"pool_size must be an integer >= 1, got True ({POOL_HINT})"),
        ("pool_size", "5", f"pool_size must be an integer >= 1, got '5' ({POOL_HINT})"),
        (
            "max_overflow",
            -2,
            "max_overflow must be an integer >= -1, got -2 "
            "(-1 means no limit on overflow connections)",
        ),
    ],
    ids=["pool_size=0", "pool_size=-1", "pool_size=True", "pool_size='5'", "max_overflow=-2"],
)
async def test_bad_pool_size_is_refused_naming_the_fix_without_the_password(
    option: str, value: Any, message: str, sinks: Sinks, fault_server: FaultServer
) -> None:
    """init() refuses a pool size QueuePool would misread, saying what the value means."""
    manager = DatabaseSessionManager()

    with pytest.raises(DatabaseConfigError, match=re.escape(message)) as caught:
        manager.init(
            url=_url_string(fault_server.app_url()), **sinks.engine_options(), **{option: value}
        )

    assert repr(manager) == "<DatabaseSessionManager new>"
    sinks.assert_clean({**exception_channels(caught.value), **_manager_channels(manager)})


# --- M-07, S-02, S-05: connection-time failures -----------------------------------------

# SQLAlchemy 2.1 wraps asyncpg's authentication error in a DBAPIError; 2.0 lets it
# through unwrapped. asyncpg's network errors (OSError) arrive unwrapped under both;
# psycopg's, all OperationalError, are always wrapped.
AUTHENTICATION_FAILED = (exc.DBAPIError, asyncpg.InvalidPasswordError)
ASYNCPG = DRIVER == "asyncpg"
REFUSED = ConnectionRefusedError if ASYNCPG else exc.OperationalError
RESET = ConnectionResetError if ASYNCPG else exc.OperationalError
UNRESOLVED = socket.gaierror if ASYNCPG else exc.OperationalError
HUNG = TimeoutError if ASYNCPG else exc.OperationalError
NETWORK_FAILURE = OSError if ASYNCPG else exc.OperationalError
# The driver's own words for a refused connection, kept in the traceback.
REFUSED_MESSAGE = (
    "Connect call failed ('{host}', {port})"
    if ASYNCPG
    else 'connection to server at "{host}", port {port} failed: Connection refused'
)


@dataclass(frozen=True)
class ConnectFailure:
    """A URL whose first connection fails, what is raised, and what its message says."""

    url: Callable[[FaultServer, FaultProxy], URL]
    error: type[BaseException] | tuple[type[BaseException], ...]
    # What the traceback says today ({host}, {port} and {user} filled in), or None
    # where it varies by platform or by race; whether the error's own message names
    # the server is test_network_failure_message_names_the_server's question.
    message: str | None
    inject: Callable[[FaultProxy], None] = lambda _: None
    # The start of the raised error's own message, where the package words it.
    own_message: str | None = None


def _through_proxy(server: FaultServer, proxy: FaultProxy) -> URL:
    return server.app_url(port=proxy.port)


CONNECT_FAILURES = {
    "refused-port": ConnectFailure(
        lambda server, _: server.app_url(port=free_port()),
        REFUSED,
        REFUSED_MESSAGE,
    ),
    "proxy-refuses": ConnectFailure(
        _through_proxy,
        RESET,
        # Racy: "Connect call failed ('host', port)" when the reset beats the TCP
        # handshake (5 times in 6 here), else "Connection reset by peer".
        None,
        FaultProxy.refuse,
    ),
    "unknown-host": ConnectFailure(
        lambda server, _: server.app_url().set(host="nonexistent.invalid"),
        UNRESOLVED,
        None,  # the resolver's words: "Name or service not known", or a DNS failure
    ),
    # The drivers' connect timeouts name no server: the package's message does, and
    # is pinned here rather than in a test of its own, which would wait 5 s again.
    "host-hangs": ConnectFailure(
        _through_proxy,
        HUNG,
        None,
        FaultProxy.accept_then_stall,
        own_message="the database at {host}:{port} did not answer within",
    ),
    "wrong-password": ConnectFailure(
        lambda server, _: server.app_url(password=WRONG_PASSWORD),
        AUTHENTICATION_FAILED,
        'password authentication failed for user "{user}"',
    ),
    # The direction that could leak the canary: the client holds it, the server
    # refuses it. (Given a wrong password, the client never holds the right one.)
    "canary-for-other-role": ConnectFailure(
        lambda server, _: server.app_url().set(username=OTHER_ROLE),
        AUTHENTICATION_FAILED,
        'password authentication failed for user "{user}"',
    ),
}


@pytest.mark.usefixtures("other_role")
@pytest.mark.parametrize("case", CONNECT_FAILURES.values(), ids=CONNECT_FAILURES.keys())
async def test_connect_failure_surfaces_at_first_session_without_the_password(
    case: ConnectFailure, sinks: Sinks, fault_server: FaultServer, proxy: FaultProxy
) -> None:
    """init() connects nothing; the first session fails within the connect timeout + 1 s."""
    url = case.url(fault_server, proxy)
    case.inject(proxy)
    manager = DatabaseSessionManager()
    # No timeout of ours: the package's default connect timeout is under test.
    manager.init(url=_url_string(url), **sinks.engine_options())
    try:
        channels = _manager_channels(manager)
        own_message = None
        if case.own_message is not None:
            own_message = re.escape(case.own_message.format(host=url.host, port=url.port))
        started = time.monotonic()
        with pytest.raises(case.error, match=own_message) as caught:
            await _open_one_connection(manager)
        elapsed = time.monotonic() - started
    finally:
        await manager.close()

    channels = {**exception_channels(caught.value), **channels}
    if case.message is not None:
        expected = case.message.format(host=url.host, port=url.port, user=url.username)
        assert expected in channels["traceback"]
    assert elapsed < CONNECT_TIMEOUT_SECONDS + 1.0
    sinks.assert_clean(channels)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(CONNECT_FAILURES["refused-port"], id="refused-port"),
        pytest.param(CONNECT_FAILURES["unknown-host"], id="unknown-host"),
    ],
)
async def test_network_failure_message_names_the_server(
    case: ConnectFailure, fault_server: FaultServer, proxy: FaultProxy
) -> None:
    """An unreachable server is named by host and port in the error's own message."""
    url = case.url(fault_server, proxy)
    case.inject(proxy)
    manager = DatabaseSessionManager()
    manager.init(url=_url_string(url))
    # "host:port" as the package writes it: asyncpg's own "('host', port)" is not enough.
    try:
        with pytest.raises(NETWORK_FAILURE, match=re.escape(f"{url.host}:{url.port}")):
            await _open_one_connection(manager)
    finally:
        await manager.close()


# --- S: the reference service, as a process of its own ----------------------------------


@pytest.mark.parametrize(
    ("url", "error_names"),
    [
        pytest.param(
            lambda server: server.app_url(port=free_port()),
            ("ConnectionRefusedError",) if ASYNCPG else ("OperationalError",),
            id="refused-port",
        ),
        pytest.param(
            lambda server: server.app_url(password=WRONG_PASSWORD),
            # The traceback's driver error, or the wrapper's name on a one-line report.
            ("InvalidPasswordError", "DBAPIError", "OperationalError"),
            id="wrong-password",
        ),
    ],
)
async def test_service_never_shows_the_password_when_the_database_fails(
    url: Callable[[FaultServer], URL], error_names: tuple[str, ...], fault_server: FaultServer
) -> None:
    """uvicorn's answers, stdout and stderr carry no form of the password given to it."""
    # The database is unreachable: the service answers /health, but never with a 200.
    async with (
        running_service(url(fault_server), ready="answering", log_level="debug") as service,
        httpx.AsyncClient(base_url=service.base_url, timeout=30) as client,
    ):
        responses = {
            "GET /health": await client.get("/health"),
            "POST /items": await client.post("/items", json={"name": "misuse"}),
        }

    output = service.stdout + service.stderr
    assert responses["GET /health"].status_code == 503, output
    assert responses["POST /items"].status_code >= 500, output
    # The failure did reach the process's output: the scan below is not of empty text.
    assert any(name in output for name in error_names), output
    assert_no_canary(
        {
            "stdout": service.stdout,
            "stderr": service.stderr,
            **{f"{name} body": response.text for name, response in responses.items()},
        }
    )
