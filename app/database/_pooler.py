"""Transaction poolers (PgBouncer in transaction mode, RDS Proxy, Supabase's, ...).

Such a pooler runs each transaction on whichever server connection is free, so
state a statement leaves on the session leaks to another client and is missing
from this client's next transaction. With `transaction_pooler=True` such a
statement is refused before it is sent, naming its transaction-scoped form.
Without it, the first sign of a pooler (a prepared statement that does not
exist, or already exists, on the server connection) says what to set.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, ExceptionContext

from ._errors import TransactionPoolerError
from ._session_statements import session_effects
from .drivers import Driver

# What to use instead of each kind of session-level statement.
_ALTERNATIVES = {
    "set": "use SET LOCAL inside the transaction, or set it for the role "
    "(ALTER ROLE ... SET) on the server",
    "set_config": "pass is_local => true: set_config(name, value, true)",
    "advisory_lock": "use pg_advisory_xact_lock() or pg_try_advisory_xact_lock(), released at "
    "the end of the transaction",
    "listen": "LISTEN needs a connection of its own: open one directly to PostgreSQL, "
    "not through the pooler",
    "prepare": "send the statement with bound parameters instead of SQL PREPARE",
    "declare": "declare the cursor without WITH HOLD and read it inside the transaction",
    "temp": "create it with ON COMMIT DROP (CREATE TEMP TABLE t ON COMMIT DROP AS SELECT ... "
    "in place of SELECT ... INTO TEMP), so that it ends with the transaction",
    "load": "load the library for every session on the server (session_preload_libraries)",
}


def install_pooler_guard(engine: Engine) -> None:
    """Refuse statements whose effect would outlive the transaction (transaction_pooler=True)."""
    event.listen(engine, "before_cursor_execute", _refuse_session_state)


def install_pooler_detection(engine: Engine, driver: Driver) -> None:
    """Name `transaction_pooler=True` when a pooler's prepared-statement clash shows."""

    def explain(context: ExceptionContext) -> None:
        if driver.is_prepared_statement_clash(context.original_exception):
            raise TransactionPoolerError(
                "a prepared statement was missing or duplicated on the server "
                "connection: a transaction pooler (PgBouncer in transaction mode, RDS "
                "Proxy, ...) is likely between the service and PostgreSQL; pass "
                "transaction_pooler=True to session_manager.init()"
            ) from context.original_exception

    event.listen(engine, "handle_error", explain)


def _refuse_session_state(_: Connection, __: Any, statement: str, *___: Any) -> None:
    for effect in session_effects(statement):
        # Let through: a DO block, as most change nothing outside their transaction
        # (README, "Known limits"), and RESET, DISCARD and UNLISTEN, which leave
        # the server connection as a new one.
        if effect.leaks:
            raise TransactionPoolerError(
                f"refused before sending: this statement changes session state "
                f"({effect.kind}), which behind a transaction pooler would leak to "
                f"another client's transaction: {_ALTERNATIVES[effect.kind]}"
            )
