"""The SQLAlchemy release the package's guarantees need, checked by `init()`."""

from __future__ import annotations

import re
import warnings

import sqlalchemy

# The 2.0 release the suite runs on (package README, "Install"). On 2.0.41 a
# cancelled caller could leave `session()` with its connection still out of the
# pool; before it, a URL that did not parse was echoed, password included.
SQLALCHEMY_FLOOR = (2, 0, 58)
_RELEASE = re.compile(r"(\d+)\.(\d+)\.(\d+)")


class UnsupportedSQLAlchemyWarning(UserWarning):
    """The installed SQLAlchemy is older than the release the package is tested on."""


def warn_below_floor(version: str | None = None) -> None:
    """Warn, with the reason and the fix, when SQLAlchemy is below `SQLALCHEMY_FLOOR`.

    A warning and not a refusal: the service keeps working, without the guarantee
    above, while its dependencies are upgraded.
    """
    installed = sqlalchemy.__version__ if version is None else version
    found = _RELEASE.match(installed)
    if found is None or tuple(map(int, found.groups())) >= SQLALCHEMY_FLOOR:
        return
    floor = ".".join(map(str, SQLALCHEMY_FLOOR))
    warnings.warn(
        f"SQLAlchemy {installed} is older than {floor}, the release this package is "
        "tested on: on older releases (2.0.41 was measured) a caller cancelled inside "
        "session() (a client disconnect, a timeout) could return while its "
        "connection was still out of the pool, which can then run dry; before "
        "2.0.41 an unparsable URL's error also showed its password. Upgrade: "
        f"pip install 'sqlalchemy[asyncio]>={floor}'",
        UnsupportedSQLAlchemyWarning,
        stacklevel=3,
    )
