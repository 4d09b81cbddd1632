"""Session state must not leak between requests: reset a pooled connection that changed it.

Each statement's text is checked for one that can outlive its transaction (a
session-level `SET`, `set_config(..., false)`, an advisory lock, `LISTEN`, ...);
only a connection that ran one pays a reset, one round trip, as it returns to the pool.
The reset returns the connection to the state the service's own connect-time setup
left it in (a `connect` listener's `SET ROLE` or `search_path`), not to a bare login:
that state is read once per connection, at its first checkout.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.pool import ConnectionPoolEntry, NullPool, PoolResetState
from sqlalchemy.util import await_only

from . import _signals as signals
from ._read_only import READ_ONLY_DEFAULT
from ._session_statements import session_effects
from .drivers import driver_of

# Named after the package, wherever the service put it (app.database here).
logger = logging.getLogger(__package__)

# What the pooled connection's `info` records: "reset" (one message puts it back
# to new) or "discard" (nothing can undo it: close the connection).
_CHANGED = "app.database.session_state_changed"
# The statements that restore what connect-time setup set (CONNECT_STATE_SQL).
_CONNECT_STATE = "app.database.connect_state"
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

# What a new connection looks like once connect-time setup ran, written by the server
# as the statements that restore it after RESET_SQL (quoted by format()): the settings
# set at session level, first, while the login user may still set any it could; then
# the session user (allowed: it is the login user, or the login user is a superuser),
# the role (not in pg_settings), the channels listened to. Read before any transaction
# of the service's own began, since pg_settings shows a SET LOCAL as "session" too.
# transaction_* settings apply only inside a transaction. Custom (dotted) settings are
# not in pg_settings at all: not restored (README, "Known limits").
CONNECT_STATE_SQL = """SELECT pg_catalog.concat_ws('; ',
 (SELECT pg_catalog.string_agg(pg_catalog.format(
     'SELECT pg_catalog.set_config(%L, %L, false)', name, setting), '; ' ORDER BY name)
   FROM pg_catalog.pg_settings
   WHERE source = 'session' AND pg_catalog.left(name, 12) <> 'transaction_'),
 pg_catalog.format('SET SESSION AUTHORIZATION %I',
   pg_catalog.current_setting('session_authorization')),
 (SELECT pg_catalog.format('SET ROLE %I', r.role) FROM (SELECT
   pg_catalog.current_setting('role') AS role) AS r WHERE r.role <> 'none'),
 (SELECT pg_catalog.string_agg(pg_catalog.format('LISTEN %I', channel), '; ')
   FROM pg_catalog.pg_listening_channels() AS channel))"""
_UNREAD = None  # the connect state could not be read: such a connection is never reset


def install_session_state_reset(engine: Engine) -> None:
    """Reset each connection that changed session state as it returns to the pool."""
    if not isinstance(engine.pool, NullPool):  # a NullPool never reuses a connection
        event.listen(engine, "checkout", _read_connect_state)  # the engine's pool
    event.listen(engine, "before_cursor_execute", _note_session_change)
    event.listen(engine, "reset", _reset_session_state)


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


def _read_connect_state(dbapi_connection: Any, record: ConnectionPoolEntry, _: Any) -> None:
    # At the first checkout, not in a `connect` listener: the service's own connect
    # listeners, added after init(), run after any of the package's. One round trip
    # per new connection (two on asyncpg), none after; `info` ends with the connection.
    if _CONNECT_STATE in record.info:
        return
    driver, connection = driver_of(record), dbapi_connection.driver_connection
    try:
        state = await_only(driver.fetch_value(connection, CONNECT_STATE_SQL, RESET_TIMEOUT_SECONDS))
    except Exception as error:
        if driver.is_closed(connection):
            # Died meanwhile (the server shut down): the pool discards it and checks
            # out another, as for a failed liveness check.
            raise DisconnectionError(
                f"reading a new connection's session state failed: {type(error).__name__}"
            ) from error
        # Not fatal (a server without one of these catalogs): the connection serves,
        # and is closed instead of reset if it ever needs a reset.
        logger.warning(
            "reading a new connection's session state failed (%s): a connection that "
            "changes session state will be closed instead of reset",
            type(error).__name__,
        )
        state = _UNREAD
    record.info[_CONNECT_STATE] = state


def _reset_session_state(
    dbapi_connection: Any, record: ConnectionPoolEntry | None, state: PoolResetState
) -> None:
    effect = None if record is None else record.info.pop(_CHANGED, None)
    if effect is None or record is None or state.terminate_only:
        return  # unchanged, or about to be closed (detached, garbage-collected)
    unread = _CONNECT_STATE in record.info and record.info[_CONNECT_STATE] is _UNREAD
    if not state.asyncio_safe or effect == _DISCARD or unread:
        # No I/O allowed here (SQLAlchemy 2.0-2.1 only say so for a connection they
        # terminate anyway), or no reset undoes it, or nothing says what to restore:
        # close it rather than reuse it.
        record.invalidate()
        if signals.session_state_reset:
            signals.session_state_reset(record, "closed")
        return
    driver, connection = driver_of(record), dbapi_connection.driver_connection
    try:
        if driver.in_transaction(connection):
            # The pool's own ROLLBACK comes after this event; RESET inside the
            # transaction would be undone by it. (A no-op for the pool afterwards.)
            dbapi_connection.rollback()
        if driver.in_transaction(connection):
            raise RuntimeError("the connection is still inside a transaction")
        restore = record.info.get(_CONNECT_STATE)
        reset = f"{RESET_SQL}; {restore}" if restore else RESET_SQL
        await_only(driver.run_simple(connection, reset, RESET_TIMEOUT_SECONDS))
        # RESET ALL also put a read-only unit's session default back to READ WRITE.
        record.info.pop(READ_ONLY_DEFAULT, None)
    except Exception as error:
        # Failed, timed out, or the connection is gone: never return it dirty.
        record.invalidate(error)
        if signals.session_state_reset:
            signals.session_state_reset(record, "failed")
    else:
        if signals.session_state_reset:
            signals.session_state_reset(record, "reset")
