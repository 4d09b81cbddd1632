"""`DatabaseSessionManager`: the engine, the session factory and their lifecycle."""

from __future__ import annotations

import asyncio
import enum
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
)

from ._classify import DatabaseErrorKind, classify_error, sqlstate_of
from ._config import parse_async_url
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
from ._read_only import (
    AUTOCOMMIT_READS,
    ReadOnlySession,
    read_only_options,
    read_only_savepoint,
    read_only_transaction_options,
)
from ._replicas import (
    MAX_REPLICA_LAG_SECONDS,
    MIN_REPLICA_LAG_SECONDS,
    PROBE_INTERVAL_SECONDS,
    REPLAYED_SQL,
    Failover,
    Replica,
    Replicas,
    ReplicaSession,
    could_not_connect,
    install_commit_positions,
    probe_engine_options,
    probing_engine,
    server_name,
)
from ._retry import (
    DEFAULT_ATTEMPTS,
    allow_final_commit,
    check_attempts,
    forbid_intermediate_commits,
    in_retried_unit,
    run_with_retries,
)
from ._signals import announce_engines, retire_engines
from ._sqlalchemy_release import warn_below_floor
from ._transaction_options import transaction_options
from ._units import observed_unit
from ._wal_position import UNKNOWN_POSITION, ensure_floor, required_position

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
        self._transaction_pooler = False
        self._replicas: Replicas | None = None
        # Engines bound with a unit's execution options, by (engine, options): built once.
        self._bound_engines: dict[tuple[int, frozenset[tuple[str, Any]]], AsyncEngine] = {}
        # One per close() still draining an engine, set when its drain is over.
        self._draining: set[asyncio.Event] = set()

    def __repr__(self) -> str:
        if self._engine is None:
            return f"<DatabaseSessionManager {self._state.value}>"
        url = self._engine.url.render_as_string(hide_password=True)
        return f"<DatabaseSessionManager {self._state.value} url={url!r}>"

    def init(
        self,
        url: str | URL,
        *,
        transaction_pooler: bool = False,
        replica_urls: Sequence[str | URL] = (),
        max_replica_lag: float = MAX_REPLICA_LAG_SECONDS,
        **engine_kwargs: Any,
    ) -> None:
        """Create the engine and session factory; call once at start-up.

        `replica_urls`: streaming replicas of `url`'s server, each given a pool sized
        like the primary's, for read-only units of work; one lagging more than
        `max_replica_lag` seconds, down or stalled is left out until it recovers.

        `engine_kwargs` go to `create_async_engine` and override the defaults
        (`pool_recycle=3600`, `hide_parameters=True`, `pool_timeout=5`; for asyncpg
        and psycopg the package's liveness check and bounded connect (5 s) and
        statement (30 s) timeouts; for other drivers `pool_pre_ping=True`), and the
        pool's shape (15 kept connections, no overflow, most recently used first)
        where the caller gives none; what the caller passes is used as given (the
        package README's "Defaults" lists them all). Nothing connects yet: the first
        session opens the first one.
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
        warn_below_floor()
        engine = build_engine(url, engine_kwargs, transaction_pooler=transaction_pooler)
        self._replicas = self._build_replicas(
            engine, replica_urls, max_replica_lag, engine_kwargs, transaction_pooler
        )
        self._transaction_pooler = transaction_pooler
        self._drain = Drain(engine, refusal=self._not_open_error)
        self._sessionmaker = async_sessionmaker(engine, **SESSION_OPTIONS)
        self._engine = engine
        self._state = _State.OPEN
        replicas = self._replicas.replicas if self._replicas else []
        announce_engines(engine, [replica.engine for replica in replicas])  # to observers

    async def close(self, *, grace: float = CLOSE_GRACE_SECONDS) -> None:
        """Dispose of the engine and its pool; safe to call twice or before `init()`.

        New sessions are refused at once. Units of work already holding a
        connection get `grace` seconds to finish; the connections still in use
        then are cut, so their work fails and is rolled back by the server.
        Every call returns only once every drain in progress is over, including one
        a concurrent call started (whose `grace` then applies, not this call's).
        """
        engine, drain, replicas = self._engine, self._drain, self._replicas
        if engine is not None and drain is not None:
            # Refuse new sessions before awaiting, so none starts on a pool being disposed.
            self._engine = None
            self._drain = None
            self._sessionmaker = None
            self._replicas = None
            self._bound_engines.clear()
            self._state = _State.CLOSED
            drained = asyncio.Event()
            self._draining.add(drained)
            try:
                # Cancelled, each still cuts its connections and disposes before raising.
                await asyncio.gather(
                    drain.close(grace), *([replicas.close(grace)] if replicas else [])
                )
            finally:
                retire_engines(engine, [r.engine for r in replicas.replicas] if replicas else [])
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

    @observed_unit  # its outcome, duration and statements, while an observer is on
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

        `read_only=True` alone runs each statement as its own read-only implicit
        transaction (one round trip each), on a replica if one is usable and has
        replayed this task's last commit, else on the primary; with an
        `isolation_level` it is one read-only transaction (one snapshot, for
        "REPEATABLE READ"). A write in it raises `ReadOnlyTransactionError`.
        """
        options = transaction_options(isolation_level, read_only, deferrable)
        if self._sessionmaker is None or self._engine is None:
            raise self._not_open_error()
        joined = isinstance(self._sessionmaker.kw.get("bind"), AsyncConnection)
        # Before any work: a commit in a task this one starts then raises this task's
        # floor too (read-your-writes), not only the child's.
        ensure_floor()
        # The pool's timeout becomes PoolExhaustedError, whose message names the fixes.
        with pool_exhaustion_explained():
            if read_only and not joined:
                session = await self._read_session(options)
            elif options and not joined:
                # On the engine, not on the session's first connection: they then hold
                # for every transaction of the unit, also after an explicit commit().
                session = self._sessionmaker(bind=self._engine_with(self.engine, options))
            else:
                session = self._sessionmaker()
            # Its exit closes the session in a task of its own and waits for that
            # through cancellations (SQLAlchemy >= 2.0.58, the floor in pyproject.toml):
            # the block is left only once the connection is back in the pool.
            async with session:
                if in_retried_unit():
                    forbid_intermediate_commits(session)
                if joined and read_only:
                    async with read_only_savepoint(session):
                        yield session
                else:
                    yield session
                # Reached only when the block did not raise: commit whatever is
                # pending, including work done after an explicit commit() in the block.
                await _commit(session, read_only=read_only)

    async def _read_session(self, options: dict[str, Any]) -> AsyncSession:
        """A read-only unit's session, on a replica that can serve it, else on the primary."""
        session = await self._replica_session(options)
        if session is None:
            session = self._sessionmaker(  # type: ignore[misc]
                bind=self._read_engine(self.engine, options), sync_session_class=ReadOnlySession
            )
        if self._autocommit_reads(options):
            session.info[AUTOCOMMIT_READS] = True
        return session

    async def _replica_session(self, options: dict[str, Any]) -> AsyncSession | None:
        replicas = self._replicas
        if replicas is None:
            return None
        if options.get("isolation_level") == "SERIALIZABLE":
            return None  # a hot standby refuses serializable mode; the primary serves it
        position = required_position(within=replicas.floor_lifetime)
        if position == UNKNOWN_POSITION:
            return None  # a write whose position is unknown: no replica can be shown to have it
        replica = replicas.pick(position)
        if replica is not None:
            session = self._sessionmaker(  # type: ignore[misc]
                bind=self._read_engine(replica.engine, options), sync_session_class=ReplicaSession
            )
            try:
                serves = await self._replica_serves(session, replicas, replica, position)
            except Exception as error:
                await session.close()
                if not could_not_connect(error):
                    raise
                replicas.set_aside(replica, error)
            except BaseException:
                await session.close()
                raise
            else:
                if serves:
                    snapshot = not self._autocommit_reads(options)
                    primary = self._read_engine(self.engine, options).sync_engine
                    Failover(replicas, replica, primary, snapshot).arm(session)
                    return session
                await session.close()
        return None

    def _autocommit_reads(self, options: dict[str, Any]) -> bool:
        return "isolation_level" not in options and not self._transaction_pooler

    @staticmethod
    async def _replica_serves(
        session: AsyncSession, replicas: Replicas, replica: Replica, position: int
    ) -> bool:
        # Connected now, before the unit runs: a replica that is down or refuses is
        # found while the primary can still take the whole unit.
        connection = await session.connection()
        if replica.replayed >= position:
            return True  # the last probe already saw it replayed that far: no round trip
        replayed = await connection.scalar(REPLAYED_SQL)
        replicas.note_replayed(replica, int(replayed or 0))
        return replica.replayed >= position

    def _read_engine(self, engine: AsyncEngine, options: dict[str, Any]) -> AsyncEngine:
        """`engine` bound for a read-only unit with `options` (transaction_options')."""
        if not self._autocommit_reads(options):
            # One read-only transaction: a snapshot for the unit, or, behind a transaction
            # pooler, where a session default would leak, BEGIN READ ONLY each time.
            return self._engine_with(engine, read_only_transaction_options(options))
        if engine.dialect.name not in ("postgresql", "sqlite"):
            raise DatabaseConfigError(
                f"read_only=True is for PostgreSQL and SQLite engines; this one is "
                f"{engine.dialect.name}: call session() without it"
            )
        return self._with_options(engine, read_only_options())

    def _engine_with(self, engine: AsyncEngine, options: dict[str, Any]) -> AsyncEngine:
        if engine.dialect.name != "postgresql":
            raise DatabaseConfigError(
                "isolation_level and deferrable are for PostgreSQL engines; "
                f"this one is {engine.dialect.name}: call session() without them"
            )
        return self._with_options(engine, options)

    def _with_options(self, engine: AsyncEngine, options: dict[str, Any]) -> AsyncEngine:
        key = (id(engine), frozenset(options.items()))
        if key not in self._bound_engines:
            # Shares the engine's pool and its listeners.
            self._bound_engines[key] = engine.execution_options(**options)
        return self._bound_engines[key]

    def _build_replicas(
        self,
        primary: AsyncEngine,
        urls: Sequence[str | URL],
        max_lag: float,
        engine_kwargs: dict[str, Any],
        transaction_pooler: bool,
    ) -> Replicas | None:
        if isinstance(urls, (str, URL)) or not isinstance(urls, Sequence):
            raise DatabaseConfigError(
                "replica_urls must be a list of URLs, e.g. replica_urls=[url_1, url_2], "
                f"not a {type(urls).__name__}"
            )
        if (
            isinstance(max_lag, bool)
            or not isinstance(max_lag, (int, float))
            or not MIN_REPLICA_LAG_SECONDS <= max_lag < math.inf
        ):
            # Below that, the lag measured between two probes would cross it every time.
            raise DatabaseConfigError(
                f"max_replica_lag must be a finite number of seconds >= "
                f"{MIN_REPLICA_LAG_SECONDS} (the replicas are probed every "
                f"{PROBE_INTERVAL_SECONDS} s), got {max_lag!r}"
            )
        if not urls:
            return None
        if str(engine_kwargs.get("isolation_level", "")).upper() == "SERIALIZABLE":
            raise DatabaseConfigError(
                "isolation_level='SERIALIZABLE' for the whole engine cannot run on a hot "
                "standby, which refuses serializable mode: give it per unit of work "
                "(session(isolation_level='SERIALIZABLE'); such read-only units run on "
                "the primary), or drop replica_urls"
            )
        if primary.dialect.name != "postgresql":
            raise DatabaseConfigError(
                f"replica_urls are for PostgreSQL streaming replicas; the primary is "
                f"{primary.dialect.name}: drop replica_urls"
            )
        replicas = []
        for index, url in enumerate(urls):
            try:
                parsed = parse_async_url(url)
            except DatabaseConfigError as error:
                raise DatabaseConfigError(f"replica_urls[{index}]: {error}") from None
            if parsed.drivername != primary.url.drivername:
                raise DatabaseConfigError(
                    f"replica_urls[{index}] uses '{parsed.drivername}' but the primary "
                    f"'{primary.url.drivername}': use the same driver for both, so that "
                    "a read behaves (types, errors, timeouts) wherever it runs"
                )
            engine = build_engine(parsed, engine_kwargs, transaction_pooler=transaction_pooler)
            drain = Drain(engine, refusal=self._not_open_error)
            probes = build_engine(
                parsed, probe_engine_options(engine_kwargs), transaction_pooler=transaction_pooler
            )
            replicas.append(
                Replica(server_name(parsed), engine, drain, probe_engine=probing_engine(probes))
            )
        result = Replicas(probing_engine(primary), replicas, float(max_lag))
        install_commit_positions(
            primary.sync_engine, result.note_primary_position, result.floor_lifetime
        )
        return result

    async def verify_replicas(self) -> None:
        """Probe the replicas now (start-up): `DatabaseConfigError` if one is not a standby.

        A replica that is down is not an error: it is used once it answers.
        """
        if self._engine is None:
            raise self._not_open_error()
        if self._replicas is not None:
            await self._replicas.verify()

    def replica_status(self) -> list[dict[str, Any]]:
        """Each replica's name (no credentials), whether reads use it, its lag, its last failure."""
        return [] if self._replicas is None else self._replicas.status()

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


async def _commit(session: AsyncSession, *, read_only: bool) -> None:
    # Flushed first, so that a failure to connect or to write is known to have
    # committed nothing: only the COMMIT itself can leave the outcome unknown.
    await session.flush()
    allow_final_commit(session)
    try:
        await session.commit()
    except TransactionAbortedError:
        raise  # refused before COMMIT was sent
    except Exception as error:
        # A read-only transaction wrote nothing: its lost COMMIT is a plain connection
        # failure (503, worth retrying), not an unknown outcome.
        if not read_only and _outcome_unknown(error):
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
