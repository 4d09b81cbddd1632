"""The slow-unit log: one warning per unit of work slower than a threshold.

Off until `log_slow_units(seconds)`: a unit's duration alone says nothing about
which threshold matters to a service. The line names the route (or else the
calling function), the duration, the statement count, the pool wait and the
outcome; never a statement or a parameter value.
"""

from __future__ import annotations

import logging
import sys
from types import FrameType
from typing import Any

from . import _signals as signals
from ._errors import DatabaseConfigError
from ._observed_engines import observe_engines, stop_observing_engines
from ._units import Unit

# Named after the package, wherever the service put it (app.database here).
logger = logging.getLogger(f"{__package__}.slow_units")

_OBSERVER = "slow-unit log"


class _Threshold:
    """The log's threshold: a holder, so that no function rebinds a global."""

    seconds: float | None = None


# Frames of these modules are the machinery between a caller and its unit of work.
_MACHINERY = (
    f"{__package__}.",
    "contextlib",
    "asyncio",
    "anyio",
    "fastapi",
    "starlette",
    "sqlalchemy",
)


def log_slow_units(threshold: float | None) -> None:
    """Log a warning for each unit of work that takes at least `threshold` seconds.

    `None` turns the log off. Applies to every manager's units, those running included.
    """
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0
    ):
        raise DatabaseConfigError(
            f"log_slow_units() takes a number of seconds >= 0, or None (off), got {threshold!r}"
        )
    _Threshold.seconds = None if threshold is None else float(threshold)
    if _Threshold.seconds is None:
        signals.unit_ended.disconnect(_log_if_slow)
        stop_observing_engines(_OBSERVER)
        return
    observe_engines(_OBSERVER)  # for the statement count and the pool wait
    signals.unit_ended.connect(_log_if_slow)


def _log_if_slow(unit: Unit) -> None:
    threshold = _Threshold.seconds
    if threshold is None or unit.duration < threshold:
        return
    caller = _caller(sys._getframe(1))
    logger.warning(
        "slow unit of work: caller=%s duration=%.3fs statements=%d pool_wait=%.3fs "
        "outcome=%s read_only=%s threshold=%.3fs",
        caller,
        unit.duration,
        unit.statements,
        unit.pool_wait,
        unit.outcome,
        "true" if unit.read_only else "false",
        threshold,
        extra={
            "unit_caller": caller,
            "unit_duration": unit.duration,
            "unit_statements": unit.statements,
            "unit_pool_wait": unit.pool_wait,
            "unit_outcome": unit.outcome,
        },
    )


def _caller(frame: FrameType | None) -> str:
    """The route being served ("GET /items/{item_id}", the template, never the path),
    else the first function outside the package and the frameworks."""
    # Only for a slow unit, so reading the frames' locals is affordable here.
    function = None
    while frame is not None:
        route = _route_of(frame.f_locals)
        if route is not None:
            return route
        module = frame.f_globals.get("__name__", "")
        if function is None and not module.startswith(_MACHINERY):
            function = f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back
    return function or "unknown"


def _route_of(local: dict[str, Any]) -> str | None:
    # An ASGI app's frames hold the request's scope, where the router put the route.
    scope = local.get("scope")
    if not isinstance(scope, dict):
        scope = getattr(local.get("request"), "scope", None)
    if not isinstance(scope, dict) or scope.get("type") not in ("http", "websocket"):
        return None
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    method = scope.get("method")
    return f"{method} {template}" if method else template
