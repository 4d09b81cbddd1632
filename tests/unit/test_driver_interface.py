"""The driver interface's own defaults, which a driver without an override (psycopg) uses."""

from __future__ import annotations

import pytest

from app.database.drivers import Driver


class _ServerError(Exception):
    def __init__(self, sqlstate: object) -> None:
        super().__init__("an error")
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "sent"),
    [("40P01", True), ("4000", False), ("", False), (None, False)],
    ids=repr,
)
def test_an_error_is_the_servers_when_it_carries_a_sqlstate(sqlstate: object, sent: bool) -> None:
    """By default an error was sent by PostgreSQL (so it aborted the transaction) when it
    carries a five-character SQLSTATE; one the driver raised before sending has none."""
    assert Driver().sent_by_server(_ServerError(sqlstate)) is sent
