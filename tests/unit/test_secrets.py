"""A password never appears in an exception, a repr or a log line."""

from __future__ import annotations

import logging
import re
import urllib.parse

import pytest
from sqlalchemy.engine import URL

from app.database import DatabaseConfigError, DatabaseSessionManager
from tests.faults.canary import assert_no_canary, exception_channels
from tests.faults.server import CANARY_PASSWORD as CANARY

ENCODED = urllib.parse.quote(CANARY, safe="")


@pytest.mark.parametrize(
    "url",
    [
        # unescaped '@' and '/' in the password: the parser sees a host with '@' in it
        f"postgresql+asyncpg://app:{CANARY}@db:5432/app",
        f"postgresql+psycopg2://app:{ENCODED}@db/app",
        f"postgresql://app:{ENCODED}@db/app",
        f"postgresql+asyncpg://app@db:5432/app?password={ENCODED}",
        f"postgresql+asyncpg://app:{ENCODED}@db:notaport/app",
        f"nosuchdb+driver://app:{ENCODED}@db/app",
    ],
)
def test_refused_urls_do_not_echo_the_password(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every refusal of a URL carrying the canary password leaves it out of all text."""
    caplog.set_level(logging.DEBUG)
    manager = DatabaseSessionManager()

    with pytest.raises(DatabaseConfigError) as caught:
        manager.init(url=url)

    assert_no_canary(
        {**exception_channels(caught.value), "repr(manager)": repr(manager), "logs": caplog.text}
    )


async def test_connection_failure_does_not_echo_the_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused connection, logged at DEBUG with echo on, never shows the password."""
    caplog.set_level(logging.DEBUG)
    manager = DatabaseSessionManager()
    url = URL.create(
        "postgresql+asyncpg", username="app", password=CANARY, host="127.0.0.1", port=1
    )
    manager.init(url=url, echo=True, echo_pool="debug", connect_args={"timeout": 2})
    try:
        assert_no_canary(
            {
                "repr(manager)": repr(manager),
                "repr(engine)": repr(manager.engine),
                "str(engine.url)": str(manager.engine.url),
            }
        )
        with pytest.raises(
            OSError, match=re.escape("could not connect to the database at 127.0.0.1:1")
        ) as caught:
            async with manager.session() as db:
                await db.connection()
    finally:
        await manager.close()

    assert_no_canary({**exception_channels(caught.value), "logs": caplog.text})
