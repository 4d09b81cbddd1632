"""Traces and metrics on OpenTelemetry, turned on by `enable_telemetry()`.

Statements and connection usage come from OpenTelemetry's SQLAlchemy
instrumentation (the `otel` extra), on every engine the package builds, replicas
included. This module adds only what that library does not measure: the wait for
a pooled connection, the pool's capacity and waiters, each unit of work's outcome
(a span around its statements, and a histogram), retries, liveness pings and
discards, session-state resets. It is the only module that imports OpenTelemetry.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation, get_meter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, QueuePool

from . import _signals as signals
from ._classify import sqlstate_of
from ._observed_engines import observe_engines, stop_observing_engines
from ._pool_wait import pool_name_of, watches
from ._units import COMMIT_FAILED, COMMIT_OUTCOME_UNKNOWN, COMMITTED, Unit

SCOPE = "app.database"
_OBSERVER = "telemetry"

# OpenTelemetry's semantic conventions for database client connection pools.
POOL_NAME = "db.client.connection.pool.name"
WAIT_TIME = "db.client.connection.wait_time"
TIMEOUTS = "db.client.connection.timeouts"
MAX_CONNECTIONS = "db.client.connection.max"
PENDING_REQUESTS = "db.client.connection.pending_requests"
SQLSTATE = "db.response.status_code"
ERROR_TYPE = "error.type"
# The package's own, where the conventions have nothing.
UNIT_SPAN = "unit of work"
UNIT_DURATION = "app.database.unit.duration"
UNIT_RETRIES = "app.database.unit.retries"
LIVENESS_PINGS = "app.database.liveness.pings"
LIVENESS_DISCARDS = "app.database.liveness.discards"
SESSION_STATE_RESETS = "app.database.session_state.resets"
OUTCOME = "app.database.unit.outcome"
READ_ONLY = "app.database.unit.read_only"
STATEMENTS = "app.database.unit.statements"
POOL_WAIT = "app.database.unit.pool_wait"
ATTEMPT = "app.database.unit.attempt"
PING_OUTCOME = "app.database.liveness.outcome"
DISCARD_REASON = "app.database.liveness.reason"
RESET_OUTCOME = "app.database.session_state.outcome"

# Seconds. A free pooled connection takes microseconds; pool_timeout is 5 s by default.
_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0)
_UNIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Telemetry:
    """The instruments, on the providers enable_telemetry() was given."""

    def __init__(
        self, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None
    ) -> None:
        self.tracer = trace.get_tracer(SCOPE, tracer_provider=tracer_provider)
        meter = get_meter(SCOPE, meter_provider=meter_provider)
        self.wait_time = meter.create_histogram(
            WAIT_TIME,
            unit="s",
            description="Time a session waited for a pooled connection.",
            explicit_bucket_boundaries_advisory=_WAIT_BUCKETS,
        )
        self.timeouts = meter.create_counter(
            TIMEOUTS,
            unit="{timeout}",
            description="Sessions that gave up waiting for a pooled connection (pool_timeout).",
        )
        meter.create_observable_up_down_counter(
            MAX_CONNECTIONS,
            callbacks=[self._capacities],
            unit="{connection}",
            description="Connections the pool can hand out at once.",
        )
        meter.create_observable_up_down_counter(
            PENDING_REQUESTS,
            callbacks=[self._waiters],
            unit="{request}",
            description="Sessions inside the pool's checkout: waiting, or checking what they got.",
        )
        self.unit_duration = meter.create_histogram(
            UNIT_DURATION,
            unit="s",
            description="Units of work, from session() to the connection's return, by outcome.",
            explicit_bucket_boundaries_advisory=_UNIT_BUCKETS,
        )
        self.retries = meter.create_counter(
            UNIT_RETRIES,
            unit="{retry}",
            description="Units of work run again after a serialization failure or deadlock.",
        )
        self.pings = meter.create_counter(
            LIVENESS_PINGS,
            unit="{ping}",
            description="Pings of pooled connections not used within the last second.",
        )
        self.discards = meter.create_counter(
            LIVENESS_DISCARDS,
            unit="{connection}",
            description="Pooled connections found dead at checkout and replaced.",
        )
        self.resets = meter.create_counter(
            SESSION_STATE_RESETS,
            unit="{connection}",
            description="Connections that changed session state, reset or closed at checkin.",
        )

    # OpenTelemetry cannot unregister an observed instrument's callback: once this
    # telemetry is turned off (or replaced), they observe nothing.
    def _capacities(self, _: CallbackOptions) -> Iterable[Observation]:
        if _Enabled.now is None or _Enabled.now[0] is not self:
            return
        for watch in watches():
            engine = watch.engine()
            capacity = None if engine is None else _capacity(engine.pool)
            if capacity is not None:
                yield Observation(capacity, {POOL_NAME: watch.name})

    def _waiters(self, _: CallbackOptions) -> Iterable[Observation]:
        if _Enabled.now is None or _Enabled.now[0] is not self:
            return
        for watch in watches():
            if watch.engine() is not None:
                yield Observation(watch.waiting, {POOL_NAME: watch.name})

    def unit_started(self, unit: Unit) -> None:
        span = self.tracer.start_span(
            UNIT_SPAN, kind=SpanKind.INTERNAL, attributes={READ_ONLY: unit.read_only}
        )
        # Current while the unit runs, so the instrumentation's statement spans nest in it.
        token = otel_context.attach(trace.set_span_in_context(span))
        unit.finishers.append(lambda ended: _finish_span(span, token, ended))

    def unit_ended(self, unit: Unit) -> None:
        attributes: dict[str, str | bool] = {OUTCOME: unit.outcome or "", READ_ONLY: unit.read_only}
        self.unit_duration.record(unit.duration, attributes)

    def unit_retried(self, _what: str, attempt: int, error: BaseException) -> None:
        sqlstate = sqlstate_of(error) or ""
        self.retries.add(1, {SQLSTATE: sqlstate})
        trace.get_current_span().add_event(
            "unit of work retried",
            {ATTEMPT: attempt, SQLSTATE: sqlstate, ERROR_TYPE: type(error).__name__},
        )

    def pool_waited(self, pool: str, seconds: float) -> None:
        self.wait_time.record(seconds, {POOL_NAME: pool})

    def pool_timed_out(self, pool: str) -> None:
        self.timeouts.add(1, {POOL_NAME: pool})

    def liveness_checked(self, record: ConnectionPoolEntry, outcome: str) -> None:
        pool = _pool_attributes(record)
        if outcome != "closed":
            self.pings.add(1, {**pool, PING_OUTCOME: "alive" if outcome == "alive" else "failed"})
        if outcome != "alive":
            self.discards.add(1, {**pool, DISCARD_REASON: outcome})

    def session_state_reset(self, record: ConnectionPoolEntry, outcome: str) -> None:
        self.resets.add(1, {**_pool_attributes(record), RESET_OUTCOME: outcome})


def _finish_span(span: Span, token: object, unit: Unit) -> None:
    span.set_attributes(
        {
            OUTCOME: unit.outcome or "",
            STATEMENTS: unit.statements,
            POOL_WAIT: unit.pool_wait,
        }
    )
    if unit.outcome != COMMITTED and unit.error is not None:
        # The class only: an error's text may quote a statement or a host.
        span.set_attribute(ERROR_TYPE, type(unit.error).__qualname__)
    if unit.outcome in (COMMIT_FAILED, COMMIT_OUTCOME_UNKNOWN):
        span.set_status(Status(StatusCode.ERROR, unit.outcome))
    span.end()
    otel_context.detach(token)  # type: ignore[arg-type]


def _pool_attributes(record: ConnectionPoolEntry) -> dict[str, str]:
    name = pool_name_of(record)
    return {} if name is None else {POOL_NAME: name}


def _capacity(pool: Pool) -> int | None:
    if not isinstance(pool, QueuePool):
        return None  # NullPool, StaticPool: no limit to wait on
    # SQLAlchemy has no accessor for max_overflow; -1 means no limit.
    overflow: int = getattr(pool, "_max_overflow", -1)
    return None if overflow < 0 else pool.size() + overflow


class _Statements:
    """The SQLAlchemy instrumentation over the package's engines.

    Its `instrument()` works once per process and takes the engines to trace then
    (an AsyncEngine's through `sync_engine`); the package's engines are built with
    a factory it cannot wrap afterwards. So each new engine (a replica, an init()
    after close()) undoes and redoes that one call over every engine still alive.
    """

    def __init__(self, instrument_options: Mapping[str, Any]) -> None:
        self._options = instrument_options
        self._engines: weakref.WeakSet[Engine] = weakref.WeakSet()
        self._owned = False

    def add(self, engines: Iterable[Engine]) -> None:
        new = [engine for engine in engines if engine not in self._engines]
        if not new:
            return
        self._engines.update(new)
        instrumentor = SQLAlchemyInstrumentor()
        if instrumentor.is_instrumented_by_opentelemetry:
            if not self._owned:
                # Someone else's (opentelemetry-instrument at start-up): its factory
                # wrappers trace the engines created after it, the package's included.
                return
            instrumentor.uninstrument()
        instrumentor.instrument(
            engines=list(self._engines),
            # Its declared range stops below SQLAlchemy 2.1; the suite runs it on 2.0 and 2.1.
            skip_dep_check=True,
            **self._options,
        )
        self._owned = True

    def engine_built(self, engine: Engine, _role: str) -> None:
        self.add([engine])

    def remove_all(self) -> None:
        if self._owned:
            SQLAlchemyInstrumentor().uninstrument()
        self._owned = False
        self._engines = weakref.WeakSet()


class _Enabled:
    """What `enable_telemetry()` started: a holder, so that no function rebinds a global."""

    now: tuple[_Telemetry, _Statements] | None = None


_HOOKS = (
    "unit_started",
    "unit_ended",
    "unit_retried",
    "pool_waited",
    "pool_timed_out",
    "liveness_checked",
    "session_state_reset",
)


def enable_telemetry(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    enable_commenter: bool = False,
    commenter_options: Mapping[str, bool] | None = None,
    engines: Sequence[AsyncEngine | Engine] = (),
) -> None:
    """Trace and measure the database layer with OpenTelemetry, from now on.

    Covers every engine the package builds (each manager's primary and replicas,
    those built before this call included) and `engines`, other engines of yours.
    The providers default to OpenTelemetry's global ones. `enable_commenter` and
    `commenter_options` go to the SQLAlchemy instrumentation (a comment with the
    trace context on each statement: see the README before turning it on).
    Called again, it starts over with the new arguments; `disable_telemetry()` stops it.
    """
    disable_telemetry()
    telemetry = _Telemetry(tracer_provider, meter_provider)
    options: dict[str, Any] = {
        "tracer_provider": tracer_provider,
        "meter_provider": meter_provider,
        "enable_commenter": enable_commenter,
        "commenter_options": dict(commenter_options or {}),
    }
    statements = _Statements(options)
    _Enabled.now = (telemetry, statements)
    for name in _HOOKS:
        getattr(signals, name).connect(getattr(telemetry, name))
    statements.add([*(engine for engine, _ in signals.live_engines()), *map(_sync_engine, engines)])
    signals.engine_built.connect(statements.engine_built)
    observe_engines(_OBSERVER)


def disable_telemetry() -> None:
    """Stop what `enable_telemetry()` started; a no-op when it is off."""
    if _Enabled.now is None:
        return
    telemetry, statements = _Enabled.now
    _Enabled.now = None
    for name in _HOOKS:
        getattr(signals, name).disconnect(getattr(telemetry, name))
    signals.engine_built.disconnect(statements.engine_built)
    stop_observing_engines(_OBSERVER)
    statements.remove_all()


def _sync_engine(engine: AsyncEngine | Engine) -> Engine:
    return engine.sync_engine if isinstance(engine, AsyncEngine) else engine
