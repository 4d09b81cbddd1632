"""Session state must not leak between requests: reset a pooled connection that changed it.

Each statement's text is checked for one that can outlive its transaction (a
session-level `SET`, `set_config(..., false)`, an advisory lock, `LISTEN`, ...);
only a connection that ran one pays a reset, one round trip, as it returns to the pool.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState
from sqlalchemy.util import await_only

from ._session_statements import session_effects
from .drivers import driver_of

# What the pooled connection's `info` records: "reset" (one message puts it back
# to new) or "discard" (nothing can undo it: close the connection).
_CHANGED = "app.database.session_state_changed"
_RESET = "reset"
_DISCARD = "discard"

# DISCARD ALL without DEALLOCATE ALL and DISCARD PLANS, which would drop asyncpg's
# cached prepared statements: its next use of one fails with "prepared statement
# __asyncpg_stmt_N__ does not exist". The DO block deallocates only statements
# made by SQL PREPARE (from_sql); asyncpg prepares through the protocol. One simple
# Query message, so one round trip, and one implicit transaction: all or nothing.
RESET_SQL = (
    "CLOSE ALL; "
    "SET SESSION AUTHORIZATION DEFAULT; "
    "RESET ALL; "
    "DO $$DECLARE s record; BEGIN FOR s IN SELECT name FROM pg_catalog.pg_prepared_statements"
    " WHERE from_sql LOOP EXECUTE pg_catalog.format('DEALLOCATE %I', s.name); END LOOP; END$$; "
    "UNLISTEN *; "
    "SELECT pg_catalog.pg_advisory_unlock_all(); "
    "DISCARD TEMP; "
    "DISCARD SEQUENCES"
)
# Like the liveness ping: a stalled network must not hang the request's exit.
RESET_TIMEOUT_SECONDS = 5.0


def install_session_state_reset(engine: Engine) -> None:
    """Reset each connection that changed session state as it returns to the pool."""
    event.listen(engine, "before_cursor_execute", _note_session_change)
    event.listen(engine, "reset", _reset_session_state)  # the engine's pool


def session_effect(statement: str) -> str | None:
    """`"reset"` or `"discard"` if `statement` can change session state, else None."""
    effects = session_effects(statement)
    if not effects:
        return None
    return _RESET if all(effect.resettable for effect in effects) else _DISCARD


def _note_session_change(connection: Connection, _cursor: Any, statement: str, *_: Any) -> None:
    # Runs for every statement: about 0.3 us for one that changes nothing.
    effect = session_effect(statement)
    if effect is not None and connection.info.get(_CHANGED) != _DISCARD:
        connection.info[_CHANGED] = effect  # the pooled connection's record: kept until reset


def _reset_session_state(
    dbapi_connection: Any, record: ConnectionPoolEntry | None, state: PoolResetState
) -> None:
    effect = None if record is None else record.info.pop(_CHANGED, None)
    if effect is None or record is None or state.terminate_only:
        return  # unchanged, or about to be closed (detached, garbage-collected)
    if not state.asyncio_safe or effect == _DISCARD:
        # No I/O allowed here (SQLAlchemy 2.0-2.1 only say so for a connection they
        # terminate anyway), or no reset undoes it: close it rather than reuse it.
        record.invalidate()
        return
    driver, connection = driver_of(record), dbapi_connection.driver_connection
    try:
        if driver.in_transaction(connection):
            # The pool's own ROLLBACK comes after this event; RESET inside the
            # transaction would be undone by it. (A no-op for the pool afterwards.)
            dbapi_connection.rollback()
        if driver.in_transaction(connection):
            raise RuntimeError("the connection is still inside a transaction")
        await_only(driver.run_simple(connection, RESET_SQL, RESET_TIMEOUT_SECONDS))
    except Exception as error:
        # Failed, timed out, or the connection is gone: never return it dirty.
        record.invalidate(error)
