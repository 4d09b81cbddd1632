"""Streaming replicas: which one a read-only unit of work may use, and when none.

A replica is used only while it is known to be a standby, answered its last probe,
and lags the primary by at most `max_replica_lag` seconds. Lag is measured by time,
not bytes: every probe samples the primary's WAL position, and a replica's lag is
the age of the oldest sample it has not replayed yet. An idle primary writes nothing
new, so a replica with nothing left to replay lags by 0, however old its last replay.

The probes run in a background task of the event loop that first needed a replica,
every `PROBE_INTERVAL_SECONDS`, off the request path, each replica's over one
connection of its own. Between probes a replica's lag is taken to grow with the
time since its last good probe, so a replica whose probes stop drops out by itself. A replica
that fails a probe (down, refusing, stalled past `PROBE_TIMEOUT_SECONDS`) or a unit
of work is set aside until a later probe succeeds; once it has failed for
`CUT_AFTER_SECONDS`, the units still running on it are cut, so that their
statements move to the primary instead of waiting out their timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState
from sqlalchemy.util import await_only

from ._classify import DatabaseErrorKind, classify_error, sqlstate_of
from ._drain import Drain
from ._errors import DatabaseConfigError
from ._read_only import UNIT_OPTION, ReadOnlySession, any_mode_options
from ._wal_position import UNKNOWN_POSITION, ensure_floor, reachable, remember_position
from .drivers import driver_of

# Named after the package, wherever the service put it (app.database here).
logger = logging.getLogger(__package__)

# "A few seconds": long enough to ride out a checkpoint or a vacuum on the replica,
# short enough that a user rarely sees a stale list after someone else's write.
MAX_REPLICA_LAG_SECONDS = 5.0
PROBE_INTERVAL_SECONDS = 0.5
MIN_REPLICA_LAG_SECONDS = 1.0
PROBE_TIMEOUT_SECONDS = 1.0
# A hiccup shorter than this leaves the units running on a replica alone (one that
# loaded ORM objects cannot move, and would fail if cut); a longer stall cuts them.
CUT_AFTER_SECONDS = 3.0
# How long after a write a replica still in use may not have replayed it: its lag,
# plus a probe's age when it was measured (an interval and a timeout) and the age of
# the primary sample it was measured against (a timeout). ReadYourWritesMiddleware's
# cookie lives the committing manager's max_replica_lag plus this.
STALENESS_MARGIN_SECONDS = PROBE_INTERVAL_SECONDS + 2 * PROBE_TIMEOUT_SECONDS

# WAL positions as integers (bytes from 0/0), compared without parsing "16/B374D848".
PRIMARY_POSITION = "SELECT (pg_catalog.pg_current_wal_insert_lsn() - '0/0')::bigint"
PRIMARY_POSITION_SQL = text(PRIMARY_POSITION)
REPLAYED_SQL = text("SELECT (pg_catalog.pg_last_wal_replay_lsn() - '0/0')::bigint")
_PROBE_SQL = text(
    "SELECT pg_catalog.pg_is_in_recovery(), (pg_catalog.pg_last_wal_replay_lsn() - '0/0')::bigint"
)


def server_name(url: URL) -> str:
    """How messages name a server: host, port and database, never the credentials."""
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


def connection_lost(error: BaseException) -> bool:
    """Whether `error` says the server or the connection, not the statement, failed."""
    # 25006: a write refused, the unit's fault wherever it runs.
    return classify_error(error) is DatabaseErrorKind.UNAVAILABLE and sqlstate_of(error) != "25006"


def could_not_connect(error: BaseException) -> bool:
    """Whether getting a connection to the server failed: down, refusing, or no answer."""
    # A connect that timed out carries no SQLSTATE (a statement's own timeout, 57014,
    # or lock wait, 55P03, would recur elsewhere; none happens while connecting).
    timed_out = classify_error(error) is DatabaseErrorKind.TIMEOUT and sqlstate_of(error) is None
    return connection_lost(error) or timed_out


@dataclass(eq=False)
class Replica:
    """One replica's engine and what the probes and units of work last saw of it."""

    name: str
    engine: AsyncEngine
    drain: Drain
    is_standby: bool | None = None  # None until a probe has answered
    replayed: int = 0
    lag: float = math.inf
    last_success: float = -math.inf
    last_failure: float = -math.inf
    failing_since: float | None = None
    failure: str | None = None
    # An engine of its own, one connection: a probe never queues behind reads, so a
    # stalled replica is found (and its units cut) however busy its pool is.
    probe_engine: AsyncEngine | None = None

    def current_lag(self) -> float:
        """The lag measured by the last good probe, plus the time since: an upper bound."""
        return self.lag + (time.monotonic() - self.last_success)

    def usable(self, max_lag: float) -> bool:
        answered = self.last_success > self.last_failure
        return bool(self.is_standby) and answered and self.current_lag() <= max_lag

    def status(self, max_lag: float) -> dict[str, Any]:
        lag = self.current_lag()
        return {
            "replica": self.name,
            "in_use": self.usable(max_lag),
            "lag_seconds": None if math.isinf(lag) else round(lag, 3),
            "failure": self.failure,
        }


@dataclass(eq=False)
class Replicas:
    """The replicas of one primary, their probes, and the choice of one per read."""

    primary: AsyncEngine  # probing_engine() of the primary's
    replicas: list[Replica]
    max_lag: float
    # (monotonic time, primary WAL position), oldest first.
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    _watcher: asyncio.Task[None] | None = None
    _watcher_loop: asyncio.AbstractEventLoop | None = None
    _closed: bool = False

    @property
    def floor_lifetime(self) -> float:
        """How long after a write a replica still in use may not have replayed it."""
        return self.max_lag + STALENESS_MARGIN_SECONDS

    def pick(self, position: int) -> Replica | None:
        """A usable replica, one known to have replayed `position` if there is one."""
        self.ensure_watching()
        usable = [replica for replica in self.replicas if replica.usable(self.max_lag)]
        caught_up = [replica for replica in usable if replica.replayed >= position]
        candidates = caught_up or usable
        return random.choice(candidates) if candidates else None

    def set_aside(self, replica: Replica, error: BaseException) -> None:
        """Stop using `replica` until a probe succeeds again."""
        replica.last_failure = time.monotonic()
        replica.failure = type(error).__name__
        logger.warning(
            "replica %s set aside (%s): reads go to the other replicas or the primary "
            "until it answers a probe again",
            replica.name,
            replica.failure,
        )

    def ensure_watching(self) -> None:
        """Start the probes in the running loop, unless they already run there."""
        loop = asyncio.get_running_loop()
        if self._closed:
            return
        if self._watcher is not None and self._watcher_loop is loop and not self._watcher.done():
            return
        self._watcher_loop = loop
        self._watcher = loop.create_task(self._watch(), name="app.database replica probes")

    async def verify(self) -> None:
        """Probe every replica now; raise `DatabaseConfigError` for one that is not a standby."""
        self.ensure_watching()
        await self.probe_all()
        primaries = [replica.name for replica in self.replicas if replica.is_standby is False]
        if primaries:
            raise DatabaseConfigError(_not_standby(primaries))

    async def close(self, grace: float) -> None:
        """Stop the probes, then drain every replica's engine as the primary's is drained."""
        self._closed = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher.get_loop() is asyncio.get_running_loop():
            # Asked again until it has ended: a cancellation can be swallowed (before
            # Python 3.12, asyncio.wait_for returns a result that arrives with it).
            while not watcher.done():
                watcher.cancel()
                await asyncio.wait({watcher}, timeout=0.1)
            if not watcher.cancelled() and watcher.exception() is not None:
                logger.warning("the replica probes had stopped: %r", watcher.exception())
        probes = [replica.probe_engine for replica in self.replicas if replica.probe_engine]
        await asyncio.gather(
            *(replica.drain.close(grace) for replica in self.replicas),
            *(engine.dispose() for engine in probes),
        )

    def status(self) -> list[dict[str, Any]]:
        return [replica.status(self.max_lag) for replica in self.replicas]

    async def _watch(self) -> None:
        while not self._closed:
            started = time.monotonic()
            try:
                await self.probe_all()
            except Exception:  # a bug here must not stop the probes for good
                logger.exception("probing the replicas failed")
            await asyncio.sleep(max(0.0, PROBE_INTERVAL_SECONDS - (time.monotonic() - started)))

    async def probe_all(self) -> None:
        await self._sample_primary()
        await asyncio.gather(*(self._probe(replica) for replica in self.replicas))

    async def _sample_primary(self) -> None:
        try:
            position = await asyncio.wait_for(primary_position(self.primary), PROBE_TIMEOUT_SECONDS)
        except Exception as error:
            # Without a fresh sample, lags are measured against older ones: they grow,
            # so a replica is set aside rather than trusted.
            logger.warning("sampling the primary's WAL position failed (%s)", type(error).__name__)
            return
        self.note_primary_position(position)

    def note_primary_position(self, position: int) -> None:
        """A sample of the primary's WAL position, taken now (by a probe or a commit).

        Every commit gives one for free: under write load the history stays fresh
        even when the primary's pool is too busy for the probe's own sample.
        """
        now = time.monotonic()
        position = reachable(position)
        if self._samples and position < self._samples[-1][1]:
            return  # read before the last sample, reported after it: older news
        self._samples.append((now, position))
        horizon = now - 2 * self.max_lag - PROBE_INTERVAL_SECONDS
        while len(self._samples) > 1 and self._samples[0][0] < horizon:
            self._samples.popleft()

    async def _probe(self, replica: Replica) -> None:
        assert replica.probe_engine is not None
        try:
            connection = await asyncio.wait_for(
                replica.probe_engine.connect(), PROBE_TIMEOUT_SECONDS
            )
        except Exception as error:
            await self._failed_probe(replica, error)
            return
        try:
            result = await asyncio.wait_for(connection.execute(_PROBE_SQL), PROBE_TIMEOUT_SECONDS)
            is_standby, replayed = result.one()
        except Exception as error:
            await self._failed_probe(replica, error)
            return
        finally:
            await connection.close()
        replica.failing_since = None
        if not is_standby:
            if replica.is_standby is not False:
                logger.error(_not_standby([replica.name]))
            replica.is_standby = False
            return
        now = time.monotonic()
        replica.is_standby = True
        self.note_replayed(replica, int(replayed or 0))
        replica.lag = self._lag(replica.replayed, now)
        replica.last_success = now
        if replica.failure is not None and replica.usable(self.max_lag):
            logger.info("replica %s back in use", replica.name)
            replica.failure = None

    async def _failed_probe(self, replica: Replica, error: BaseException) -> None:
        now = time.monotonic()
        if replica.last_success >= replica.last_failure:
            self.set_aside(replica, error)
        else:
            replica.last_failure = now
        if replica.failing_since is None:
            replica.failing_since = now
        elif now - replica.failing_since >= CUT_AFTER_SECONDS:
            # Units of work still on it would wait out their statement timeout.
            await replica.drain.cut_in_use()

    def note_replayed(self, replica: Replica, replayed: int) -> None:
        replica.replayed = max(replica.replayed, replayed)

    def _lag(self, replayed: int, now: float) -> float:
        # Not even the oldest sample replayed: how far behind is unknown (at start-up,
        # the history is young; later, the oldest is 2 x max_lag old anyway).
        if not self._samples or self._samples[0][1] > replayed:
            return math.inf
        for sampled_at, position in self._samples:
            if position > replayed:
                return now - sampled_at
        # Everything sampled is replayed; what was written since the newest sample is
        # not known to be: lag is at most that sample's age.
        return now - self._samples[-1][0]


async def primary_position(engine: AsyncEngine) -> int:
    """The primary's WAL insert position now, through `engine` (a probing_engine())."""
    async with engine.connect() as connection:
        value = await connection.scalar(PRIMARY_POSITION_SQL)
    return int(value)


# In a pooled connection's `info` from the commit of a read-write transaction until
# the connection goes back to the pool, where its WAL position is read.
_COMMITTED = "app.database.committed_write"
_POSITION_TIMEOUT_SECONDS = 5.0


def install_commit_positions(
    engine: Engine, on_position: Callable[[int], None], carried_for: float
) -> None:
    """After each read-write COMMIT on `engine`, remember the primary's WAL position.

    Read on the committing connection itself as it goes back to the pool: one round
    trip, no second checkout, and only after a COMMIT (a unit that failed pays none).
    The task remembers it, for its client to bring back for `carried_for` seconds (the
    replicas' floor lifetime); `on_position` gets it too (a lag sample).
    """

    def remember(
        dbapi_connection: Any, record: ConnectionPoolEntry | None, state: PoolResetState
    ) -> None:
        position = _commit_position(dbapi_connection, record, state)
        if position is not None:
            remember_position(position, carried_for=carried_for)
            if position != UNKNOWN_POSITION:
                on_position(position)

    event.listen(engine, "commit", _note_commit)
    # First among the reset listeners: the session-state reset may close the connection.
    event.listen(engine, "reset", remember, insert=True)
    # A Core connection's close runs in a task of its own (AsyncConnection's exit): the
    # floor must exist in the connecting task before, for the position to reach it.
    event.listen(engine, "engine_connect", lambda _: ensure_floor())


def _note_commit(connection: Connection) -> None:
    # Before COMMIT is sent: a failed one costs a needless read, never a missed one.
    if connection.get_execution_options().get(UNIT_OPTION) is None:  # not a read-only unit
        connection.info[_COMMITTED] = True


def _commit_position(
    dbapi_connection: Any, record: ConnectionPoolEntry | None, state: PoolResetState
) -> int | None:
    """The WAL position after this connection's COMMIT; None if it committed nothing."""
    if record is None or not record.info.pop(_COMMITTED, False):
        return None
    if state.terminate_only:
        return None  # garbage-collected: in no task of the unit's, so nobody to tell
    if not state.asyncio_safe or dbapi_connection is None:
        return UNKNOWN_POSITION  # no I/O possible here: read from the primary
    try:
        position = await_only(
            driver_of(record).fetch_value(
                dbapi_connection.driver_connection, PRIMARY_POSITION, _POSITION_TIMEOUT_SECONDS
            )
        )
    except Exception as error:
        # The unit's outcome stands; only its task's reads lose the replicas.
        logger.warning(
            "reading the primary's WAL position after a commit failed (%s): this task's "
            "reads go to the primary",
            type(error).__name__,
        )
        # Timed out or failed: its state (a CancelRequest in flight) is unknown.
        record.invalidate(error)
        return UNKNOWN_POSITION
    return reachable(int(position))


# What the probes' own one-connection engine must not take from the caller's options.
_POOL_OPTIONS = ("poolclass", "pool_size", "max_overflow", "pool_timeout", "pool_use_lifo")


def probe_engine_options(engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The caller's engine options (timeouts, connect_args) for a one-connection pool."""
    options = {name: value for name, value in engine_kwargs.items() if name not in _POOL_OPTIONS}
    return {**options, "pool_size": 1, "max_overflow": 0}


def probing_engine(engine: AsyncEngine) -> AsyncEngine:
    """`engine` for the package's own one-statement reads: autocommit, either mode."""
    return engine.execution_options(**any_mode_options())


def _not_standby(names: list[str]) -> str:
    return (
        f"replica_urls names a server that is not a standby ({', '.join(names)}: "
        "pg_is_in_recovery() is false): it is a primary, so reads sent there could miss "
        "writes and writes could land there; it is never used: fix replica_urls"
    )


# In the `info` of a session reading from a replica: where its statements move if
# the replica fails under them.
_FAILOVER = "app.database.failover"


@dataclass(eq=False)
class Failover:
    """Where a replica's read-only unit of work goes on if the replica fails mid-way."""

    replicas: Replicas
    replica: Replica
    primary: Engine  # the primary's engine for the same kind of read-only unit
    snapshot: bool  # one snapshot for the unit (REPEATABLE READ): only before it is taken

    def arm(self, session: Any) -> None:
        session.info[_FAILOVER] = self


class ReplicaSession(ReadOnlySession):
    """The sync session of a read-only unit on a replica: a statement the replica could not
    serve (connection lost, cut as stalled) runs again on the primary.

    Safe because the unit only reads and, in autocommit, each statement is a snapshot
    of its own: running it on the primary is what a READ COMMITTED transaction there
    would have done. Not once ORM objects are loaded (the switch expires them, and
    an async session cannot reload them implicitly) nor, for a snapshot unit, once
    its snapshot is taken: such a unit fails with the replica's error.
    """

    # _execute_internal is where execute(), scalar(), scalars(), get() and the ORM's
    # loads all meet (SQLAlchemy 2.0 and 2.1); the tests run this on both series.
    def _execute_internal(self, *args: Any, **kwargs: Any) -> Any:
        failover: Failover | None = self.info.get(_FAILOVER)
        if failover is None:
            return super()._execute_internal(*args, **kwargs)
        try:
            result = super()._execute_internal(*args, **kwargs)
        except Exception as error:
            if len(self.identity_map) or not connection_lost(error):
                raise
            del self.info[_FAILOVER]
            failover.replicas.set_aside(failover.replica, error)
            self.rollback()  # gives the failed connection back; nothing was loaded
            self.bind = failover.primary
            return super()._execute_internal(*args, **kwargs)
        if failover.snapshot:
            del self.info[_FAILOVER]
        return result
