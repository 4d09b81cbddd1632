"""`on_commit(session, callback)`: side effects that happen only once the data is committed.

Django's `transaction.on_commit`, for the package's sessions. A callback runs after
the outermost COMMIT of the session's transaction succeeds, in registration order;
never if that transaction rolls back (or its COMMIT fails); one registered inside
`begin_nested()` is dropped if that savepoint rolls back, kept if it is released.

How: listeners for the Session events of `GuardedSession`, the sync class of every
session the package hands out. Pending callbacks live in `session.info`, each with
the savepoints open when it was registered, and are gone once the transaction ends
(they hold the callbacks' closures: nothing may outlive the unit of work).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.util import await_only

from ._guards import GuardedSession, _connections_of

# Named after the package, wherever the service put it (app.database here).
logger = logging.getLogger(__package__)

OnCommitCallback = Callable[[], object]
"""A zero-argument callable; if it returns an awaitable, that is awaited."""

# In Session.info: the callbacks registered in the open transaction, and the root
# transaction whose COMMIT succeeded, with its callbacks, until that transaction ends.
_PENDING = "app.database.on_commit.pending"
_COMMITTED = "app.database.on_commit.committed"
# In Connection.info, for app.database.testing: where callbacks go whose session
# "committed" only a savepoint of a transaction still open on that connection.
_CAPTURE = "app.database.on_commit.capture"


@dataclass(frozen=True, slots=True)
class _Pending:
    callback: OnCommitCallback
    # The savepoints open at registration, innermost first: a rollback of any of
    # them undoes the work the callback stands for.
    savepoints: tuple[SessionTransaction, ...]


@dataclass(frozen=True, slots=True)
class _Committed:
    transaction: SessionTransaction
    callbacks: list[OnCommitCallback]
    # None: a real COMMIT, run them. A list: the session was joined to an outer
    # transaction still open (test isolation) and a capture is active: add them to it.
    capture: list[OnCommitCallback] | None
    # Joined to an outer transaction that has not committed: never run them here.
    joined: bool


def on_commit(session: AsyncSession | Session, callback: OnCommitCallback) -> None:
    """Call `callback()` once the outermost COMMIT of `session`'s transaction succeeds.

    `session`: a session of the package (`session_manager.session()`, `get_db` /
    `AsyncSessionDep`, `run_in_transaction`, the test toolkit's), async or its sync
    `Session`. `callback`: a zero-argument callable; if it returns an awaitable
    (an `async def` function does), that is awaited. Callbacks run in registration
    order, before `commit()` (and so `session()`'s exit, or `AsyncSessionDep`'s,
    before the response) returns. A callback that raises is logged at ERROR on
    the package's logger (`app.database` here) and the others still run: the data stays committed
    and nothing is raised to the caller. Cancellation is not swallowed.
    Never run if the transaction rolls back; a callback registered inside
    `begin_nested()` is dropped if that savepoint rolls back.
    """
    sync_session = session.sync_session if isinstance(session, AsyncSession) else session
    if not isinstance(sync_session, GuardedSession):
        raise TypeError(
            f"on_commit() needs a session of {__package__} (session_manager.session(), "
            f"AsyncSessionDep, get_db, or {__package__}.testing's joined_session()): only "
            f"their commits run callbacks; got a {type(sync_session).__qualname__}"
        )
    if not callable(callback):
        raise TypeError(f"on_commit() needs a callable of no arguments, got {callback!r}")
    if not sync_session.in_transaction():
        # Tie the callback to a transaction now: the one the session's next statement
        # would begin anyway (no connection is taken until then).
        sync_session.begin()
    pending: list[_Pending] = sync_session.info.setdefault(_PENDING, [])
    pending.append(_Pending(callback, _open_savepoints(sync_session)))


def _open_savepoints(session: Session) -> tuple[SessionTransaction, ...]:
    savepoints = []
    transaction = session.get_nested_transaction()
    while transaction is not None:
        if transaction.nested:
            savepoints.append(transaction)
        transaction = transaction.parent
    return tuple(savepoints)


@event.listens_for(GuardedSession, "after_soft_rollback")
def _drop_rolled_back(session: Session, previous_transaction: SessionTransaction) -> None:
    # Fires for every rollback, from the innermost transaction out. What a
    # rollback undoes is the nearest savepoint or root at or above the transaction
    # rolled back (a flush's internal subtransaction rolls back its enclosing one).
    pending: list[_Pending] | None = session.info.get(_PENDING)
    if not pending:
        return
    boundary: SessionTransaction | None = previous_transaction
    while boundary is not None and not (boundary.nested or boundary.parent is None):
        boundary = boundary.parent
    if boundary is None or boundary.parent is None:
        session.info.pop(_PENDING, None)  # the whole transaction rolled back
        return
    pending[:] = [entry for entry in pending if boundary not in entry.savepoints]


@event.listens_for(GuardedSession, "after_commit")
def _remember_commit(session: Session) -> None:
    # Also fires when a savepoint is released (RELEASE SAVEPOINT): its callbacks stay
    # pending, now belonging to the enclosing transaction.
    if session.in_nested_transaction():
        return
    root = session.get_transaction()  # the one committing: closed only after this event
    if root is None:  # pragma: no cover - SQLAlchemy dispatches inside commit()
        return
    callbacks = [entry.callback for entry in session.info.pop(_PENDING, [])]
    # A session joined to a transaction it does not control (test isolation's
    # join_transaction_mode="create_savepoint") committed a savepoint only: its
    # connection is still inside the outer transaction, which may yet roll back.
    connections = list(_connections_of(root))
    if not connections and isinstance(session.bind, Connection):
        connections = [session.bind]
    still_open = [c for c in connections if not c.closed and c.in_transaction()]
    capture = next(
        (c.info[_CAPTURE] for c in still_open if _CAPTURE in c.info),
        None,
    )
    session.info[_COMMITTED] = _Committed(root, callbacks, capture, joined=bool(still_open))


@event.listens_for(GuardedSession, "after_transaction_end")
def _run_after_commit(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is not None:
        return  # a savepoint or a flush's subtransaction
    # The root transaction ended: committed, rolled back or closed. Nothing it
    # registered survives it, whatever happens below.
    committed: _Committed | None = session.info.pop(_COMMITTED, None)
    session.info.pop(_PENDING, None)
    if committed is None or committed.transaction is not transaction:
        return
    if committed.capture is not None:
        committed.capture.extend(committed.callbacks)
    elif committed.joined:
        if committed.callbacks:
            logger.debug(
                "%d on_commit callback(s) not run: the session committed a savepoint of "
                "an outer transaction it does not control",
                len(committed.callbacks),
            )
    else:
        # Run here, inside SQLAlchemy's greenlet, rather than after `await commit()`
        # returns in async code: this event is the one point every path to COMMIT
        # passes (an explicit commit(), session()'s exit, get_db, begin() blocks,
        # run_sync), and it fires after the connection went back to the pool and
        # the session left its transaction, so a callback can open a unit of work
        # of its own. await_only() awaits an async callback on the event loop from
        # here, so commit() returns only once every callback is done.
        _run(committed.callbacks)


def _run(callbacks: list[OnCommitCallback]) -> None:
    for callback in callbacks:
        try:
            result = callback()
            if inspect.isawaitable(result):
                # MissingGreenlet (a sync Session used outside SQLAlchemy's asyncio
                # layer) is logged like any failure; await_only closes the awaitable.
                await_only(result)
        except Exception:
            # Raising would turn committed work into an error (a 500 for data that is
            # written, and a retry that would write it twice): log it instead.
            logger.error(
                "on_commit callback %s failed; the transaction IS committed and stays "
                "committed, the remaining callbacks still run",
                callback_name(callback),
                exc_info=True,
            )


def callback_name(callback: Any) -> str:
    """The callback's qualified name, or its repr (a partial, a callable object)."""
    name = getattr(callback, "__qualname__", None)
    module = getattr(callback, "__module__", None)
    if isinstance(name, str):
        return f"{module}.{name}" if isinstance(module, str) else name
    return repr(callback)


@contextmanager
def capturing(connection: Connection) -> Iterator[list[OnCommitCallback]]:
    """For `testing/`: collect the callbacks of sessions that commit a savepoint of `connection`.

    Those sessions never reach a real COMMIT while `connection`'s transaction is
    open, so their callbacks would not run; they are appended to the list yielded
    instead, in the order their sessions committed. Nested captures each see theirs.
    """
    previous: list[OnCommitCallback] | None = connection.info.get(_CAPTURE)
    captured: list[OnCommitCallback] = []
    connection.info[_CAPTURE] = captured
    try:
        yield captured
    finally:
        if previous is None:
            connection.info.pop(_CAPTURE, None)
        else:
            connection.info[_CAPTURE] = previous
