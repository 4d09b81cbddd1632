"""WAL positions, and the one a task's reads must see: the core of read-your-writes.

After a read-write unit of work commits on the primary (only when replicas are
configured), the primary's WAL position is remembered for the rest of the task:
the request, under FastAPI. A later read-only unit uses a replica only if it has
replayed that far. `ReadYourWritesMiddleware` carries the position to the same
client's next requests.
"""

from __future__ import annotations

import re
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

# Beyond any real WAL position: "a write whose position is unknown", read from the
# primary. Written as FFFFFFFF/FFFFFFFF, so a cookie can carry it too.
UNKNOWN_POSITION = (1 << 64) - 1

# WAL pages (XLOG_BLCKSZ) begin with a header, 24 bytes, or 40 on a segment's first
# page; a record is at least 24 bytes long, so no record ends at those offsets. An
# insert position there (after a segment switch, or a record ending on the page
# boundary) is one replay never reports until the next record: the page's start is.
_WAL_PAGE = 8192
_PAGE_HEADERS = (24, 40)


@dataclass
class _Floor:
    position: int = 0
    raised_at: float = field(default_factory=time.monotonic)
    # How long, from the response, the client must keep bringing the position back
    # (the middleware's cookie): the longest floor lifetime of the managers that
    # committed, whether or not their commit raised the position. Counted from the
    # response rather than the commit: a little longer, never shorter.
    carried_for: float = 0.0


# A mutable holder, so that a position remembered in a copy of the context (a task
# started by the request, a sync route's thread) reaches the whole request.
_floor: ContextVar[_Floor | None] = ContextVar("app_database_read_floor", default=None)


def ensure_floor() -> None:
    """Give this task a floor now, so that tasks it starts later share it."""
    if _floor.get() is None:
        _floor.set(_Floor())


def new_floor(position: int) -> object:
    """A fresh floor at `position` for this task (a request); returns the token to reset."""
    return _floor.set(_Floor(position))


def reset_floor(token: object) -> None:
    _floor.reset(token)  # type: ignore[arg-type]


def required_position(within: float = float("inf")) -> int:
    """The WAL position a replica must have replayed to serve this task's reads; 0 if none.

    A floor last raised more than `within` seconds ago is 0: every replica still in use
    has replayed it by then. So a floor a long-lived task made (a worker, a `main()`
    that wrote before serving) and its tasks inherit never pins reads for good.
    """
    floor = _floor.get()
    if floor is None or time.monotonic() - floor.raised_at > within:
        return 0
    return floor.position


def remember_position(position: int, *, carried_for: float) -> None:
    """Raise this task's floor to `position` (a commit's WAL position, or UNKNOWN_POSITION);
    the client must bring it back for the next `carried_for` seconds."""
    floor = _floor.get()
    if floor is None:
        floor = _Floor()
        _floor.set(floor)
    if position >= floor.position:
        floor.position, floor.raised_at = position, time.monotonic()
    # Also for a position below the floor (one brought as FFFFFFFF/FFFFFFFF, or another
    # cluster's): that write must be carried for its own manager's lifetime too.
    floor.carried_for = max(floor.carried_for, carried_for)


def seconds_to_carry() -> float:
    """How long the client must bring this task's floor back: 0 if nothing committed."""
    floor = _floor.get()
    return 0.0 if floor is None else floor.carried_for


def reachable(position: int) -> int:
    """`position`, or the start of its page if it points just past a page header."""
    offset = position % _WAL_PAGE
    return position - offset if offset in _PAGE_HEADERS else position


def format_position(position: int) -> str:
    """A WAL position as PostgreSQL writes it (`16/B374D848`)."""
    return f"{position >> 32:X}/{position & 0xFFFFFFFF:X}"


_POSITION = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


def parse_position(value: str) -> int | None:
    """A position written by `format_position`; None for anything else."""
    match = _POSITION.fullmatch(value)
    if match is None:
        return None
    return (int(match[1], 16) << 32) | int(match[2], 16)
