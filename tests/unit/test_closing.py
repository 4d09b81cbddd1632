"""Closing without a server: terminating a connection outside the event loop, and what a
failed COMMIT's outcome is."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import exc

from app.database import _closing, _manager
from app.database.drivers import driver_for
from tests.drivers import DRIVER


def test_outside_an_event_loop_no_cancel_is_built() -> None:
    """Garbage collection can terminate a connection with no event loop running: no
    CancelRequest is built (nothing could send it), and asking for one raises nothing."""
    driver = driver_for(DRIVER)
    assert driver is not None

    assert _closing._cancel_sender(driver, object()) is None


async def test_a_cancel_request_is_repeated_while_it_gets_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sent, it goes again after each pause (one may have reached a backend that had not
    read its statement yet); one that fails or times out is the last (a network that did
    not carry it would not carry the next), and nothing is raised."""
    monkeypatch.setattr(_closing, "CANCEL_REPEAT_PAUSES_SECONDS", (0.0, 0.0, 0.0))
    outcomes = iter(["sent", "sent", "refused", "sent"])
    attempts: list[str] = []

    async def send() -> None:
        attempts.append(next(outcomes))
        if attempts[-1] == "refused":
            raise OSError("connection refused")

    async def stall() -> None:
        attempts.append("stalled")
        await asyncio.sleep(10)

    await _closing._cancel_repeatedly(send, timeout=0.5)
    await _closing._cancel_repeatedly(stall, timeout=0.01)

    assert attempts == ["sent", "sent", "refused", "stalled"]


@pytest.mark.parametrize(
    ("error", "unknown"),
    [
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), True),  # 08003
        (exc.DisconnectionError("connection lost"), True),  # no SQLSTATE at all
        (asyncpg.AdminShutdownError("terminating connection"), True),  # 57P01
        (asyncpg.QueryCanceledError("canceling statement due to statement timeout"), False),
        (asyncpg.SerializationError("could not serialize access"), False),
        (ValueError("not the database's"), False),
    ],
    ids=[
        "connection lost",
        "lost, no SQLSTATE",
        "server shut down",
        "statement timeout",
        "serialization",
        "other",
    ],
)
def test_only_a_commit_left_unanswered_has_an_unknown_outcome(
    error: BaseException, unknown: bool
) -> None:
    """A COMMIT whose connection broke, or that the server ended, may have committed; one
    the server answered with an error (a statement timeout, a conflict) rolled back."""
    assert _manager._outcome_unknown(error) is unknown
