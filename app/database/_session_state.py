"""Session state must not leak between requests: reset a pooled asyncpg connection that changed it.

Each statement's text is checked for one that can outlive its transaction (a
session-level `SET`, `set_config(..., false)`, an advisory lock, `LISTEN`, ...);
only a connection that ran one pays a reset, one round trip, as it returns to the pool.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolResetState
from sqlalchemy.util import await_only

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

# Whitespace and comments before a statement's first word.
_LEAD = r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*"
# Statements whose effect outlives the transaction, by their first words. SET LOCAL,
# SET TRANSACTION and SET CONSTRAINTS end with the transaction: not counted. RESET,
# UNLISTEN, DEALLOCATE, CLOSE and DISCARD only move back towards a new session.
_SESSION_STATEMENT = re.compile(
    rf"(?:\A|;){_LEAD}(?:"
    r"SET\s+(?!LOCAL\b|TRANSACTION\b|CONSTRAINTS\b)"
    r"|LISTEN\b|PREPARE\b|DECLARE\b"
    r"|CREATE\s+(?:OR\s+REPLACE\s+)?(?:(?:LOCAL|GLOBAL)\s+)?TEMP(?:ORARY)?\b"
    r"|(?P<load>LOAD\b))",
    re.IGNORECASE | re.DOTALL,
)
# A cheap first look: could the text start with one of those words (or a comment)?
_STARTS_WITH_KEYWORD = re.compile(r"\s*(?:set|listen|prepare|declare|create|load|--|/\*)")
# Functions with a session-level effect, anywhere in a statement (not the _xact_
# advisory locks, which end with the transaction).
_SESSION_FUNCTION = re.compile(
    r"\b(?:(?P<set_config>set_config)|pg_(?:try_)?advisory_lock(?:_shared)?)\s*\(",
    re.IGNORECASE,
)
# set_config's is_local argument written as a constant true: transaction-scoped.
_TRUE = frozenset({"true", "'true'", "'t'", "'on'", "'yes'", "'1'", "true::boolean"})


def install_session_state_reset(engine: Engine) -> None:
    """Reset each asyncpg connection that changed session state as it returns to the pool."""
    event.listen(engine, "before_cursor_execute", _note_session_change)
    event.listen(engine, "reset", _reset_session_state)  # the engine's pool


def session_effect(statement: str) -> str | None:
    """`"reset"` or `"discard"` if `statement` can change session state, else None."""
    # Runs for every statement: plain substring tests first, the regexes only on a hit.
    lowered = statement.lower()
    effect = None
    if _STARTS_WITH_KEYWORD.match(lowered) or ";" in lowered:
        for match in _SESSION_STATEMENT.finditer(lowered):
            if match.group("load"):
                return _DISCARD  # a loaded library stays loaded: only a new session drops it
            effect = _RESET
    if effect is None and ("set_config" in lowered or "advisory_lock" in lowered):
        for match in _SESSION_FUNCTION.finditer(lowered):
            if not (match.group("set_config") and _is_local(lowered, match.end())):
                return _RESET
    return effect


def _is_local(statement: str, start: int) -> bool:
    """Whether the set_config call whose arguments begin at `start` has is_local = true."""
    arguments: list[str] = []
    depth, quoted, begin = 0, False, start
    for position in range(start, len(statement)):
        character = statement[position]
        if character == "'":
            quoted = not quoted  # '' inside a literal toggles twice: no harm
        elif quoted:
            continue
        elif character == "(":
            depth += 1
        elif character in ",)" and depth == 0:
            arguments.append(statement[begin:position])
            if character == ")":
                break
            begin = position + 1
        elif character == ")":
            depth -= 1
    # A bound parameter ($3) could be either: counted as session-level.
    return len(arguments) == 3 and " ".join(arguments[2].split()).lower() in _TRUE


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
    driver_connection = dbapi_connection.driver_connection
    try:
        if driver_connection.is_in_transaction():
            # The pool's own ROLLBACK comes after this event; RESET inside the
            # transaction would be undone by it. (A no-op for the pool afterwards.)
            dbapi_connection.rollback()
        if driver_connection.is_in_transaction():
            raise RuntimeError("the connection is still inside a transaction")
        await_only(driver_connection.execute(RESET_SQL, timeout=RESET_TIMEOUT_SECONDS))
    except Exception as error:
        # Failed, timed out, or the connection is gone: never return it dirty.
        record.invalidate(error)
