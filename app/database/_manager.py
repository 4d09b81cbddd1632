"""`DatabaseSessionManager`: the engine, the session factory and their lifecycle."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)

from ._classify import DatabaseErrorKind, classify_error, sqlstate_of
from ._drain import Drain
from ._engine import build_engine
from ._errors import (
    CommitOutcomeUnknownError,
    DatabaseAlreadyInitializedError,
    DatabaseConfigError,
    DatabaseNotInitializedError,
    TransactionAbortedError,
)
from ._exhaustion import pool_exhaustion_explained
from ._guards import GuardedSession
from ._retry import (
    DEFAULT_ATTEMPTS,
    allow_final_commit,
    check_attempts,
    forbid_intermediate_commits,
    in_retried_unit,
    run_with_retries,
)
from ._transaction_options import transaction_options

T = TypeVar("T")

# expire_on_commit=False: attributes stay loaded after commit, so a route can return
# a committed object without an implicit (and, in async, illegal) reload.
# GuardedSession: refuses to commit a unit of work in which a statement failed.
SESSION_OPTIONS: dict[str, Any] = {"expire_on_commit": False, "sync_session_class": GuardedSession}


# Long enough for a typical request to finish; short enough for an orchestrator's
# shutdown budget (Kubernetes allows 30 s by default).
CLOSE_GRACE_SECONDS = 10.0


def joined_sessionmaker(connection: AsyncConnection) -> async_sessionmaker[AsyncSession]:
    """Sessions inside `connection`'s open transaction, each in a savepoint of its own."""
    return async_sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", **SESSION_OPTIONS
    )


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class DatabaseSessionManager:
    """Owns one async engine and its session factory, from `init()` to `close()`."""

    def __init__(self) -> None:
        self._state = _State.NEW
        self._engine: AsyncEngine | None = None
        self._drain: Drain | None = None
        self._sessionmaker: async_sessionmaker[AsyncSession] | None = None
        # One per close() still draining an engine, set when its drain is over.
        self._draining: set[asyncio.Event] = set()

    def __repr__(self) -> str:
        if self._engine is None:
            return f"<DatabaseSessionManager {self._state.value}>"
        url = self._engine.url.render_as_string(hide_password=True)
        return f"<DatabaseSessionManager {self._state.value} url={url!r}>"

    def init(
        self, url: str | URL, *, transaction_pooler: bool = False, **engine_kwargs: Any
    ) -> None:
        """Create the engine and session factory; call once at start-up.

        `engine_kwargs` go to `create_async_engine` and override the defaults
        (`pool_recycle=3600`, `hide_parameters=True`, `pool_timeout=5`; for asyncpg
        and psycopg the package's liveness check and bounded connect (5 s) and
        statement (30 s) timeouts; for other drivers `pool_pre_ping=True`). A QueuePool is
        built to keep all `pool_size + max_overflow` connections, most recently
        used first. Nothing connects yet: the first session opens the first one.
        """
        if self._state is _State.OPEN:
            raise DatabaseAlreadyInitializedError(
                "DatabaseSessionManager is already initialised: call "
                "`await session_manager.close()` before calling `init()` again"
            )
        if not isinstance(transaction_pooler, bool):
            raise DatabaseConfigError(
                f"transaction_pooler must be True or False, got {transaction_pooler!r}"
            )
        engine = build_engine(url, engine_kwargs, transaction_pooler=transaction_pooler)
        self._drain = Drain(engine, refusal=self._not_open_error)
        self._sessionmaker = async_sessionmaker(engine, **SESSION_OPTIONS)
        self._engine = engine
        self._state = _State.OPEN

    async def close(self, *, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """Dispose of the engine and its pool; safe to call twice or before `init()`.

        New sessions are refused at once. Units of work already holding a
        connection get `grace` seconds to finish; the connections still in use
        then are cut, so their work fails and is rolled back by the server.
        Every call returns only once every drain in progress is over, including one
        a concurrent call started (whose `grace` then applies, not this call's).
        """
        engine, drain = self._engine, self._drain
        if engine is not None and drain is not None:
            # Refuse new sessions before awaiting, so none starts on a pool being disposed.
            self._engine = None
            self._drain = None
            self._sessionmaker = None
            self._state = _State.CLOSED
            drained = asyncio.Event()
            self._draining.add(drained)
            try:
                # Cancelled, it still cuts the connections and disposes before raising.
                await drain.close(grace)
            finally:
                self._draining.discard(drained)
                drained.set()
        # A signal handler's and the lifespan's close() may overlap, and init() may
        # have reopened the manager meanwhile: wait for the other calls' drains too.
        for other in list(self._draining):
            await other.wait()

    @property
    def engine(self) -> AsyncEngine:
        """The open engine, for health checks, pool statistics and migrations."""
        if self._engine is None:
            raise self._not_open_error()
        return self._engine

    @asynccontextmanager
    async def session(
        self,
        *,
        isolation_level: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
    ) -> AsyncIterator[AsyncSession]:
        """One unit of work: commit on clean exit, roll back on any exception.

        Cancellation counts as an exception. The session is always closed, which
        returns its connection to the pool; the pool rolls back anything left open.
        The block is left only once that is done, even when cancelled.
        `isolation_level` ("SERIALIZABLE", "REPEATABLE READ", "READ COMMITTED"),
        `read_only` and `deferrable` apply to this unit's transaction only. A
        connection lost at COMMIT raises `CommitOutcomeUnknownError`.
        """
        options = transaction_options(isolation_level, read_only, deferrable)
        if self._sessionmaker is None or self._engine is None:
            raise self._not_open_error()
        overrides: dict[str, Any] = {}
        joined = isinstance(self._sessionmaker.kw.get("bind"), AsyncConnection)
        if options and not joined:
            # On the engine, not on the session's first connection: they then hold for
            # every transaction of the unit, also after an explicit commit().
            overrides["bind"] = self._engine_with(options)
        # The pool's timeout becomes PoolExhaustedError, whose message names the fixes.
        with pool_exhaustion_explained():
            # Its exit closes the session in a task of its own and waits for that
            # through cancellations (SQLAlchemy >= 2.0.58, the floor in pyproject.toml):
            # the block is left only once the connection is back in the pool.
            async with self._sessionmaker(**overrides) as session:
                if in_retried_unit():
                    forbid_intermediate_commits(session)
                if joined and read_only:
                    # Joined to a test's open transaction, whose level cannot change:
                    # read-only can, inside the session's savepoint, which ends it. So
                    # a write in a read-only unit fails in tests as in production.
                    await session.execute(text("SET TRANSACTION READ ONLY"))
                yield session
                # Reached only when the block did not raise: commit whatever is pending,
                # including work done after an explicit commit() inside the block.
                await _commit(session)

    def _engine_with(self, options: dict[str, Any]) -> AsyncEngine:
        engine = self.engine
        if engine.dialect.name != "postgresql":
            raise DatabaseConfigError(
                "isolation_level, read_only and deferrable are for PostgreSQL engines; "
                f"this one is {engine.dialect.name}: call session() without them"
            )
        # Shares the engine's pool and its listeners.
        return engine.execution_options(**options)

    async def run_in_transaction(
        self,
        work: Callable[[AsyncSession], Awaitable[T]],
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        isolation_level: str | None = None,
        read_only: bool = False,
        deferrable: bool = False,
    ) -> T:
        """`await work(session)` in a unit of work, run again whole if it loses a conflict.

        A serialization failure (40001) or deadlock (40P01), raised by a statement
        or by COMMIT, rolls the attempt back; `work` then runs again in a new unit
        of work, after a short random wait, up to `attempts` times in all. The
        last attempt's error propagates. `work` must have no side effect outside
        the database except through `on_commit`, which runs once, for the attempt
        that committed.
        """
        # Bad options are refused by the first attempt's session(), before it connects
        # or calls `work`; DatabaseConfigError is not retried.
        attempts = check_attempts(attempts)

        async def attempt() -> T:
            async with self.session(
                isolation_level=isolation_level, read_only=read_only, deferrable=deferrable
            ) as session:
                return await work(session)

        return await run_with_retries(attempt, attempts, getattr(work, "__qualname__", "work"))

    @contextmanager
    def _sessions_joining(self, connection: AsyncConnection) -> Iterator[None]:
        """For `testing/`: every `session()` joins `connection`'s open transaction.

        Each session works in a savepoint, so its commit() releases the savepoint
        and its rollback() rolls back to it; the outer transaction stays intact.
        """
        if self._sessionmaker is None:
            raise self._not_open_error()
        production = self._sessionmaker
        joined = joined_sessionmaker(connection)
        self._sessionmaker = joined
        try:
            yield
        finally:
            # Unless close() (or close() then init()) ran meanwhile: never resurrect
            # a factory whose engine was disposed.
            if self._sessionmaker is joined:
                self._sessionmaker = production

    def _not_open_error(self) -> DatabaseNotInitializedError:
        if self._state is _State.CLOSED:
            return DatabaseNotInitializedError(
                "DatabaseSessionManager is closed: `close()` was called, so no new "
                "sessions can start; call `session_manager.init(url=...)` to reopen it"
            )
        return DatabaseNotInitializedError(
            "DatabaseSessionManager is not initialised: call "
            "`session_manager.init(url=...)` at start-up, for example in your "
            "FastAPI lifespan, before using the database"
        )


async def _commit(session: AsyncSession) -> None:
    # Flushed first, so that a failure to connect or to write is known to have
    # committed nothing: only the COMMIT itself can leave the outcome unknown.
    await session.flush()
    allow_final_commit(session)
    try:
        await session.commit()
    except TransactionAbortedError:
        raise  # refused before COMMIT was sent
    except Exception as error:
        if _outcome_unknown(error):
            raise CommitOutcomeUnknownError(
                "the connection was lost before COMMIT was answered: the transaction "
                "may or may not have committed, so it is not retried; check the data, "
                "or make the work idempotent (an idempotency key) before running it again"
            ) from error
        raise


def _outcome_unknown(error: BaseException) -> bool:
    sqlstate = sqlstate_of(error)
    if sqlstate in ("57P01", "57P02"):
        # The server ended the session during COMMIT (a shutdown, a terminate): it may
        # have written the commit already (synchronous replication then says
        # "already committed locally").
        return True
    # The connection broke (class 08: asyncpg also gives its own broken-socket error
    # 08003) or timed out on the client: no answer. Any other error is the server's
    # answer: rolled back.
    lost = classify_error(error) in (DatabaseErrorKind.UNAVAILABLE, DatabaseErrorKind.TIMEOUT)
    return lost and (sqlstate is None or sqlstate.startswith("08"))


session_manager = DatabaseSessionManager()
"""The process-wide manager; `init()` it in the lifespan, never at import time."""
