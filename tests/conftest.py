"""Root fixtures: the package's own pytest plugin gives the rollback-isolated database."""

from __future__ import annotations

import os

import pytest
from sqlalchemy.engine import make_url

from tests.drivers import DRIVERNAME

# pytester runs inner pytest sessions for the plugin's own tests.
pytest_plugins = ["app.database.testing.pytest_plugin", "pytester"]


def pytest_configure(config: pytest.Config) -> None:
    # The plugin reads TEST_DATABASE_URL first: point it at the driver under test
    # (TEST_DRIVER), on the server the ini option names.
    if not os.environ.get("TEST_DATABASE_URL"):
        configured = make_url(str(config.getini("test_database_url")))
        url = configured.set(drivername=DRIVERNAME)
        os.environ["TEST_DATABASE_URL"] = url.render_as_string(hide_password=False)


def pytest_report_header() -> str:
    return f"driver under test: {DRIVERNAME} (TEST_DRIVER)"
