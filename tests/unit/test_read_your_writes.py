"""ReadYourWritesMiddleware: the cookie that carries a client's last write position."""

from __future__ import annotations

import contextvars
import time

import httpx
import pytest
from fastapi import FastAPI

from app.database import DatabaseConfigError, ReadYourWritesMiddleware
from app.database._replicas import STALENESS_MARGIN_SECONDS
from app.database._wal_position import (
    UNKNOWN_POSITION,
    format_position,
    parse_position,
    reachable,
    remember_position,
    required_position,
)


def _app() -> FastAPI:
    app = FastAPI()

    @app.post("/write/{position}")
    async def write(position: int) -> int:
        # As a commit on the primary does, with max_replica_lag=2.0 in init().
        remember_position(position, carried_for=2.0 + STALENESS_MARGIN_SECONDS)
        return required_position()

    @app.get("/read")
    async def read() -> int:
        return required_position()

    app.add_middleware(ReadYourWritesMiddleware)
    return app


@pytest.mark.parametrize("position", [0, 1, 0x16B374D848, (1 << 64) - 1])
def test_positions_round_trip_in_postgresql_notation(position: int) -> None:
    assert parse_position(format_position(position)) == position


def test_postgresql_notation_is_what_it_writes() -> None:
    assert format_position(0x16B374D848) == "16/B374D848"


@pytest.mark.parametrize("value", ["", "16", "16/", "/1", "x/1", "1/2/3", "123456789/0", " 1/2"])
def test_anything_else_is_not_a_position(value: str) -> None:
    assert parse_position(value) is None


async def test_a_write_sends_its_position_and_the_next_request_brings_it_back() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/read")).json() == 0
        response = await client.post("/write/4096")
        # max_replica_lag and the probes' staleness margin, 2.5 s, rounded up.
        assert "Max-Age=5" in response.headers["set-cookie"]
        assert "HttpOnly" in response.headers["set-cookie"]
        assert client.cookies["db_position"] == "0/1000"
        assert (await client.get("/read")).json() == 4096
        # A lower position (one brought as FFFFFFFF/FFFFFFFF, another cluster's) never
        # lowers the client's floor; the cookie goes out again, for that write's life too.
        lower = await client.post("/write/10")
        assert lower.json() == 4096
        assert "db_position=0/1000; Max-Age=5;" in lower.headers["set-cookie"]
        # A request that commits nothing leaves the client's cookie as it is.
        assert "set-cookie" not in (await client.get("/read")).headers


async def test_another_client_and_a_malformed_cookie_bring_no_position() -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as writer:
        await writer.post("/write/4096")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as other:
        assert (await other.get("/read")).json() == 0
        for cookie in ("db_position=nonsense", "db_position", 'db_position="1/2', "=;;="):
            response = await other.get("/read", headers={"cookie": cookie})
            assert response.status_code == 200
            assert response.json() == 0


async def test_an_unknown_position_is_sent_as_the_highest_one() -> None:
    """A position not read after a commit: this client's reads go to the primary, for the
    cookie's life, in this request and its next ones."""
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(f"/write/{UNKNOWN_POSITION}")
        assert response.json() == UNKNOWN_POSITION
        assert client.cookies["db_position"] == "FFFFFFFF/FFFFFFFF"
        assert (await client.get("/read")).json() == UNKNOWN_POSITION


async def test_the_cookie_lives_as_long_as_the_longest_lived_write_needs() -> None:
    """Two managers commit in one request: one whose position could not be read (its
    replicas may lag 1 s), then one with a lower position whose replicas may lag 30 s.
    The value stays the highest position, the life is the second write's."""
    app = FastAPI()

    @app.post("/writes")
    async def writes() -> None:
        remember_position(UNKNOWN_POSITION, carried_for=1.0 + STALENESS_MARGIN_SECONDS)
        remember_position(4096, carried_for=30.0 + STALENESS_MARGIN_SECONDS)

    app.add_middleware(ReadYourWritesMiddleware)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/writes")

    assert "db_position=FFFFFFFF/FFFFFFFF; Max-Age=33;" in response.headers["set-cookie"]


async def test_a_max_replica_lag_of_its_own_is_refused_naming_the_fix() -> None:
    """The middleware once took max_replica_lag; passing it now says where the lag comes
    from instead of failing every request with a bare TypeError."""
    app = FastAPI()
    app.add_middleware(ReadYourWritesMiddleware, max_replica_lag=5.0)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with pytest.raises(DatabaseConfigError, match=r"follows init\(max_replica_lag=\.\.\.\)"):
            await client.get("/")


@pytest.mark.parametrize(
    ("position", "reachable_at"),
    [
        (0x4000028, 0x4000000),  # just past a segment's first page header (40 bytes)
        (0x4002018, 0x4002000),  # just past another page's header (24 bytes)
        (0x4002030, 0x4002030),  # a record's end
        (0x4000000, 0x4000000),
    ],
)
def test_a_position_just_past_a_page_header_is_reached_at_the_page_start(
    position: int, reachable_at: int
) -> None:
    """Replay never reports an offset inside a page header: an idle replica stays usable."""
    assert reachable(position) == reachable_at


def test_a_floor_older_than_the_replicas_can_lag_no_longer_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long-lived task's floor (a worker, a main() that wrote) never pins reads for good."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])

    def in_fresh_context() -> tuple[int, int, int]:
        remember_position(4096, carried_for=1.0)
        clock[0] += 5.0
        fresh = required_position(within=7.5)
        clock[0] += 5.0
        stale = required_position(within=7.5)
        remember_position(
            8192, carried_for=1.0
        )  # a new write raises it again, and restarts its clock
        return fresh, stale, required_position(within=7.5)

    assert contextvars.Context().run(in_fresh_context) == (4096, 0, 8192)
