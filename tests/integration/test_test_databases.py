"""create_test_database's refusals: what a run is told when it cannot have its database."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import URL

from app.database.testing import DatabaseSetupError, create_test_database

PASSWORD = "not-to-be-shown-7f3a"


async def test_an_existing_database_is_refused_not_reused(database_url: URL) -> None:
    """A database that exists already (this run's own, here) is refused by name: it may be
    another run's, so it is neither reused nor dropped."""
    with pytest.raises(DatabaseSetupError, match="already exists") as refused:
        await create_test_database(database_url)

    assert repr(database_url.database) in str(refused.value)


async def test_a_server_that_does_not_answer_is_named_without_the_password(
    database_url: URL,
) -> None:
    """No server at the URL (a closed port): DatabaseSetupError names where, password hidden."""
    url = database_url.set(host="127.0.0.1", port=1, password=PASSWORD, database="nowhere")

    with pytest.raises(DatabaseSetupError, match=r"127\.0\.0\.1:1") as refused:
        await create_test_database(url)

    assert PASSWORD not in str(refused.value)
