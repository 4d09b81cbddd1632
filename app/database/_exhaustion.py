"""Pool exhaustion as `PoolExhaustedError`: SQLAlchemy's message, plus what to change."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import exc

from ._errors import PoolExhaustedError

# SQLAlchemy's page on "QueuePool limit of size ... reached", linked from the message.
_SQLALCHEMY_ERROR_CODE = "3o7r"
_FIXES = (
    "every connection the pool may open stayed in use that long: raise pool_size or "
    "max_overflow if the database can take more connections, hold each for less time "
    "(shorter transactions, no slow calls inside a unit of work), or change pool_timeout"
)


@contextmanager
def pool_exhaustion_explained() -> Iterator[None]:
    """Re-raise the pool's `sqlalchemy.exc.TimeoutError` from the block as `PoolExhaustedError`."""
    try:
        yield
    except PoolExhaustedError:
        raise  # from a unit of work nested in this one: already explained
    except exc.TimeoutError as error:
        # SQLAlchemy's own text first ("QueuePool limit of size 5 overflow 0 reached,
        # connection timed out, timeout 5.00"): code matching on it keeps working.
        pool_message = error.args[0] if error.args else "connection timed out"
        raise PoolExhaustedError(
            f"{pool_message}: {_FIXES}", code=_SQLALCHEMY_ERROR_CODE
        ) from error
