"""Validation of what `init()` is given, before any engine or connection exists.

Every message here is built from the dialect, driver, pool class and option
names only (the pool sizes aside), never from the URL or an option's value, so
none of them can carry a password.
"""

from __future__ import annotations

import difflib
from typing import Any

from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.create import _pool_translate_kwargs
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import (
    AsyncAdaptedQueuePool,
    NullPool,
    Pool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)
from sqlalchemy.util import get_cls_kwargs, get_func_kwargs

from ._errors import DatabaseConfigError
from ._transaction_options import ISOLATION_LEVELS
from .drivers import driver_for

# The async driver to suggest for each backend when a URL names none, or a sync one.
ASYNC_DRIVERS = {
    "postgresql": "asyncpg",
    "sqlite": "aiosqlite",
    "mysql": "aiomysql",
    "mariadb": "aiomysql",
}

# Every default below is listed, with its reason, in the package README's
# "Defaults" section; tests/unit/test_documented_defaults.py holds the two together.
ENGINE_DEFAULTS: dict[str, Any] = {
    # Replace connections the server closed while they sat idle in the pool
    # (for asyncpg and psycopg, build_engine swaps this for the package's cheaper check).
    "pool_pre_ping": True,
    # Recycle before server or proxy idle limits cut connections (RDS, PgBouncer).
    "pool_recycle": 3600,
    # Keep statement parameters (which may hold user secrets) out of error text.
    "hide_parameters": True,
}

# SQLAlchemy waits 30 s for a pooled connection: a burst should get a prompt 503.
# The drivers' own waits (connecting, each statement) are set by drivers/.
POOL_TIMEOUT_SECONDS = 5.0

# For a queue pool only (the other pool classes take none of these).
POOL_DEFAULTS: dict[str, Any] = {
    # A fixed pool: a QueuePool closes an overflow connection as it comes back and
    # opens a new one for the next burst (at concurrency 32, 11-16 new PostgreSQL
    # connections per 1,000 requests on SQLAlchemy's 5 + 10, none on 15 kept: the
    # root README's "Benchmarks"). 15 is the most SQLAlchemy's own defaults (5 + 10)
    # let a process hold, so a connection budget planned for those still holds.
    "pool_size": 15,
    "max_overflow": 0,
    "pool_timeout": POOL_TIMEOUT_SECONDS,
    # The connection used last goes out first: the liveness check's "used moments
    # ago" holds under load, and spare connections stay idle.
    "pool_use_lifo": True,
}

# What create_engine() / create_async_engine() take themselves, beside the dialect's,
# the pool's and the Engine's arguments (sqlalchemy/engine/create.py). `pool` is
# refused before this is consulted.
_CREATE_ENGINE_OPTIONS = frozenset(
    {
        "async_creator",
        "connect_args",
        "creator",
        "empty_in_strategy",
        "enable_from_linting",
        "future",
        "module",
        "plugins",
        "poolclass",
        "strategy",
    }
)
# init()'s own keyword arguments, offered when a misspelt option is close to one.
_INIT_OPTIONS = ("transaction_pooler", "replica_urls", "max_replica_lag")
# What the pool classes that take no queue options do instead, for the refusal.
_POOL_CLASS_NATURE = {
    NullPool: "opens a connection for each checkout and keeps none",
    StaticPool: "holds one connection for the whole engine (SQLite's in-memory "
    "databases get it by default: each connection would have a database of its own)",
}


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
    """The caller's engine options over the package's defaults, each checked first.

    What the caller passed is used as given; a default fills only what is absent.
    Whatever create_async_engine() would reject, or a connection would fail on
    later, is refused here with `DatabaseConfigError`. Messages name options and
    classes, never a value that could be a secret.
    """
    _check_pool_sizes(overrides)
    dialect: Any = url.get_dialect().get_async_dialect_cls(url)
    poolclass = _pool_class(overrides, dialect, url)
    _check_options_taken(overrides, url, dialect, poolclass)
    driver = driver_for(dialect.driver)
    if driver is not None:
        _check_isolation_level(overrides)
    queue_pool = issubclass(poolclass, QueuePool)
    options = {**ENGINE_DEFAULTS, **(POOL_DEFAULTS if queue_pool else {}), **overrides}
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


def _check_pool_sizes(overrides: dict[str, Any]) -> None:
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


def _pool_class(overrides: dict[str, Any], dialect: Any, url: URL) -> type[Pool]:
    """The pool class the engine will get: the caller's, else the dialect's for `url`."""
    if "pool" in overrides:
        # SQLAlchemy would use it as is: the pool options, the package's defaults and
        # connect_args (the drivers' timeouts) would not reach it.
        raise DatabaseConfigError(
            "pool= (a pool already built) bypasses the pool options, the package's "
            "defaults and connect_args: pass poolclass= and the pool's options instead "
            "(e.g. poolclass=sqlalchemy.pool.NullPool, or pool_size=N)"
        )
    poolclass = overrides.get("poolclass")
    if poolclass is None:
        default: type[Pool] = dialect.get_pool_class(url)
        return default
    if not (isinstance(poolclass, type) and issubclass(poolclass, Pool)):
        given = type(poolclass).__name__
        raise DatabaseConfigError(
            f"poolclass must be a pool class such as sqlalchemy.pool.NullPool, got "
            f"{'an instance of ' if isinstance(poolclass, Pool) else 'a '}{given}: "
            f"pass a class, e.g. poolclass={given if isinstance(poolclass, Pool) else 'NullPool'}"
        )
    if issubclass(poolclass, (QueuePool, SingletonThreadPool)) and not issubclass(
        poolclass, AsyncAdaptedQueuePool
    ):
        raise DatabaseConfigError(
            f"poolclass={poolclass.__name__} is for synchronous engines and cannot serve "
            "asyncio: use sqlalchemy.pool.AsyncAdaptedQueuePool (the default, or leave "
            "poolclass out) or sqlalchemy.pool.NullPool"
        )
    return poolclass


def _check_options_taken(
    overrides: dict[str, Any], url: URL, dialect: Any, poolclass: type[Pool]
) -> None:
    """Refuse an option that create_async_engine() would reject for this dialect and pool."""
    if "plugins" in overrides or "plugin" in url.query:
        return  # plugins take options of their own, which only they know
    pool_options = _pool_options(poolclass)
    taken = (
        _CREATE_ENGINE_OPTIONS
        | pool_options
        | set(get_cls_kwargs(dialect))
        | set(get_func_kwargs(dialect.import_dbapi))
        | set(get_cls_kwargs(Engine))
    )
    # Leading underscores: SQLAlchemy's private switches, left to it.
    for name in sorted(n for n in overrides if n not in taken and not n.startswith("_")):
        if name in _pool_options(AsyncAdaptedQueuePool):
            nature = _POOL_CLASS_NATURE.get(poolclass, "takes no such option")
            fix = f"remove {name}=" + (" or poolclass=" if "poolclass" in overrides else "")
            raise DatabaseConfigError(
                f"{name}= applies to a queue pool, but this engine's pool is "
                f"{poolclass.__name__}, which {nature}: {fix}"
            )
        close = difflib.get_close_matches(name, [*taken, *_INIT_OPTIONS], n=1)
        hint = (
            f"did you mean {close[0]}=?"
            if close
            else "remove it (SQLAlchemy's create_engine() documents the options it takes)"
        )
        raise DatabaseConfigError(
            f"unknown option {name}= for init() (not taken by {dialect.__name__} with "
            f"{poolclass.__name__}): {hint}"
        )


def _pool_options(poolclass: type[Pool]) -> set[str]:
    """The create_engine() names of the options `poolclass` takes (timeout -> pool_timeout)."""
    names = get_cls_kwargs(poolclass) - {"creator", "dialect"}
    return {_pool_translate_kwargs.get(name, name) for name in names}


def _check_isolation_level(overrides: dict[str, Any]) -> None:
    """A level PostgreSQL has, for the whole engine; SQLAlchemy checks only on connecting."""
    if "isolation_level" not in overrides:
        return
    given = overrides["isolation_level"]
    level = given.upper().replace("_", " ") if isinstance(given, str) else ""
    if level == "AUTOCOMMIT":
        raise DatabaseConfigError(
            "isolation_level='AUTOCOMMIT' for the whole engine would leave session() "
            "nothing to roll back when a unit of work fails: for reads without BEGIN "
            "and COMMIT use session(read_only=True) or ReadSessionDep, and for one unit "
            "at another level session(isolation_level=...)"
        )
    if level not in ISOLATION_LEVELS:
        raise DatabaseConfigError(
            f"isolation_level must be one of {', '.join(map(repr, ISOLATION_LEVELS))} "
            "(or left out for the server's default)"
        )
