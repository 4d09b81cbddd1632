"""Building the engine: the package's defaults and its connection checks."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._closing import install_prompt_close
from ._config import engine_options, parse_async_url
from ._connect_errors import install_connect_errors
from ._guards import install_commit_guard
from ._liveness import install_liveness_check
from ._pooler import install_pooler_detection, install_pooler_guard
from ._read_only import (
    install_read_only_errors,
    install_read_only_mode,
    postgresql_switch,
    sqlite_switch,
)
from ._session_state import install_session_state_reset
from .drivers import driver_for, remember_driver


def build_engine(
    url: str | URL, engine_kwargs: dict[str, Any], *, transaction_pooler: bool = False
) -> AsyncEngine:
    """Validate `url`, apply the defaults, and add the package's checks to the engine."""
    parsed = parse_async_url(url)
    driver = driver_for(parsed.get_dialect().driver)
    options = engine_options(engine_kwargs, parsed, transaction_pooler=transaction_pooler)
    # A check costing 0-1 round trips instead of pre-ping's 1-3, unless the caller
    # asked for pool_pre_ping either way.
    cheap_liveness = driver is not None and "pool_pre_ping" not in engine_kwargs
    if cheap_liveness:
        options["pool_pre_ping"] = False
    # The pool is built as the options say: the caller's sizes as given, the
    # package's fixed pool (_config.POOL_DEFAULTS) only where none were passed.
    engine = create_async_engine(parsed, **options)
    sync_engine = engine.sync_engine
    if driver is not None:
        # First among the handle_error listeners: one that raises (the pooler
        # detection) stops SQLAlchemy from calling those after it.
        install_commit_guard(sync_engine, driver)
        install_read_only_errors(sync_engine)
        remember_driver(sync_engine, driver)
        if cheap_liveness:
            install_liveness_check(sync_engine)
        install_connect_errors(sync_engine, driver)
        install_prompt_close(sync_engine, driver, transaction_pooler=transaction_pooler)
        if transaction_pooler:
            # Nothing session-level gets through, so there is nothing to reset; and a
            # reset would run on whichever server connection the pooler picks.
            install_pooler_guard(sync_engine)
        else:
            install_session_state_reset(sync_engine)
            install_pooler_detection(sync_engine, driver)
            install_read_only_mode(sync_engine, postgresql_switch(driver))
    elif engine.dialect.name == "sqlite":
        install_read_only_errors(sync_engine)
        install_read_only_mode(sync_engine, sqlite_switch)
    return engine
