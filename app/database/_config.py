"""Validation of what `init()` is given, before any engine or connection exists.

Every message here is built from the dialect and driver names only, never from
the URL itself, so none of them can carry its password.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import QueuePool

from ._errors import DatabaseConfigError
from .drivers import driver_for

# The async driver to suggest for each backend when a URL names none, or a sync one.
ASYNC_DRIVERS = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
}

ENGINE_DEFAULTS: dict[str, Any] = {
    # Replace connections the server closed while they sat idle in the pool
    # (for asyncpg, the manager swaps this for its cheaper check).
    "pool_pre_ping": True,
    # Recycle before server or proxy idle limits cut connections (RDS, PgBouncer).
    "pool_recycle": 3600,
    # Keep statement parameters (which may hold user secrets) out of error text.
    "hide_parameters": True,
}

# SQLAlchemy waits 30 s for a pooled connection: a burst should get a prompt 503.
# The drivers' own waits (connecting, each statement) are set by drivers/.
POOL_TIMEOUT_SECONDS = 5.0


def parse_async_url(url: object) -> URL:
    """Return `url` as a `URL` whose driver is async, or raise `DatabaseConfigError`."""
    if isinstance(url, URL):
        parsed = url
    elif isinstance(url, str):
        if url.count("@") > 1:
            # An unescaped '@' (or '/') in the password shifts its tail into the host or
            # database name, from where it would reach DNS errors and server logs.
            raise DatabaseConfigError(
                "database URL has more than one '@', which usually means the password "
                "contains unescaped special characters: percent-encode it "
                "(urllib.parse.quote(password, safe='')) or build the URL with "
                "sqlalchemy.URL.create(...)"
            )
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            # `from None`: older SQLAlchemy versions echoed the whole URL in the cause.
            raise DatabaseConfigError(
                "database URL could not be parsed: expected a URL such as "
                "'postgresql+asyncpg://user:password@host:5432/dbname'"
            ) from None
    else:
        raise DatabaseConfigError(
            f"database URL must be a string, not {type(url).__name__}: pass the URL "
            "itself, e.g. init(url=settings.database_url)"
        )

    backend, _, driver = parsed.drivername.partition("+")
    suggestion = f"{backend}+{ASYNC_DRIVERS.get(backend, '<async driver>')}://..."
    if not driver:
        raise DatabaseConfigError(
            f"database URL '{backend}://...' does not name a driver, and the one "
            "SQLAlchemy would pick depends on its version (for PostgreSQL, the "
            f"synchronous psycopg2 in 2.0): use '{suggestion}'"
        )
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise DatabaseConfigError(
            f"unknown database dialect '{parsed.drivername}': use a URL such as "
            "'postgresql+asyncpg://...'"
        ) from None
    if not dialect.get_async_dialect_cls(parsed).is_async:
        raise DatabaseConfigError(
            f"driver '{driver}' is synchronous and cannot be used with asyncio: use '{suggestion}'"
        )
    if "password" in parsed.query:
        raise DatabaseConfigError(
            "database URL carries a password in its query string, where it is shown in "
            "reprs and logs: put it in the user-info part or use sqlalchemy.URL.create(...)"
        )
    return parsed


def engine_options(
    overrides: dict[str, Any], url: URL, *, transaction_pooler: bool = False
) -> dict[str, Any]:
    """Merge the caller's engine options over the defaults and check the pool sizes."""
    for name, minimum, hint in (
        (
            "pool_size",
            1,
            "0 would mean an unbounded pool; to disable pooling pass "
            "poolclass=sqlalchemy.pool.NullPool",
        ),
        ("max_overflow", -1, "-1 means no limit on overflow connections"),
    ):
        value = overrides.get(name, minimum)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise DatabaseConfigError(
                f"{name} must be an integer >= {minimum}, got {value!r} ({hint})"
            )
    options = {**ENGINE_DEFAULTS, **overrides}
    # Only a QueuePool takes pool_timeout (SQLite's in-memory databases get another).
    dialect_class: Any = url.get_dialect()
    poolclass = options.get("poolclass") or dialect_class.get_pool_class(url)
    if isinstance(poolclass, type) and issubclass(poolclass, QueuePool):
        options.setdefault("pool_timeout", POOL_TIMEOUT_SECONDS)
        # The connection used last goes out first, for every pool shape: the liveness
        # check's "used moments ago" holds under load, and spare connections stay idle.
        options.setdefault("pool_use_lifo", True)
    driver = driver_for(url.get_dialect().driver)
    creator = next((name for name in ("async_creator", "creator") if name in options), None)
    if driver is not None and creator is not None:
        # SQLAlchemy then ignores connect_args: every timeout, the pooler settings
        # and psycopg's bounded connections would silently be gone.
        raise DatabaseConfigError(
            f"{creator}= bypasses connect_args, and with them the package's timeouts and "
            "transaction-pooler settings: to set per-connection values (a rotating "
            "password or token), listen for SQLAlchemy's 'do_connect' event on "
            "session_manager.engine.sync_engine and update its cparams instead"
        )
    if driver is not None:
        # Merged key by key, so that connect_args={"server_settings": ...} keeps them.
        connect_args = dict(options.get("connect_args") or {})
        driver.add_connect_defaults(connect_args, url, transaction_pooler=transaction_pooler)
        options["connect_args"] = connect_args
    elif transaction_pooler:
        raise DatabaseConfigError(
            f"transaction_pooler=True needs a PostgreSQL driver the package knows "
            f"(asyncpg or psycopg), not '{url.drivername}'"
        )
    return options
