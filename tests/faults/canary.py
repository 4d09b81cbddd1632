"""Find a canary password in named output channels, so a leak says where it happened.

A channel is any text a user or operator could see: an exception's chain, a
traceback, log records, captured stdout, a repr, an HTTP body, a process's output.
"""

from __future__ import annotations

import re
import traceback
import urllib.parse
from collections.abc import Iterator, Mapping

from tests.faults.server import CANARY_PASSWORD

# Characters each side of a hit shown in the failure message.
EXCERPT = 40


def canary_forms(secret: str = CANARY_PASSWORD) -> dict[str, str]:
    """Every spelling under which `secret` could appear, by name."""
    forms = {
        "raw": secret,
        "quote": urllib.parse.quote(secret),
        "quote_plus": urllib.parse.quote_plus(secret),
        "quote_safe_empty": urllib.parse.quote(secret, safe=""),
    }
    # Its head up to the first character a URL must escape: every encoding keeps it,
    # so a spelling not listed above (or a password cut in two by a misparse) is found.
    head = re.split(r"[^A-Za-z0-9_.~-]", secret, maxsplit=1)[0]
    if len(head) >= 8:
        forms["head"] = head
    return forms


def canary_hits(
    channels: Mapping[str, str], secret: str = CANARY_PASSWORD
) -> dict[str, dict[str, str]]:
    """Per channel that leaks, each form found in it and an excerpt around the first hit."""
    hits: dict[str, dict[str, str]] = {}
    for channel, text in channels.items():
        for form, spelling in canary_forms(secret).items():
            at = text.find(spelling)
            if at >= 0:
                excerpt = text[max(0, at - EXCERPT) : at + len(spelling) + EXCERPT]
                hits.setdefault(channel, {})[form] = excerpt
    return hits


def assert_no_canary(channels: Mapping[str, str], secret: str = CANARY_PASSWORD) -> None:
    """Fail naming every channel, and every form, in which `secret` appears."""
    hits = canary_hits(channels, secret)
    assert not hits, "password leaked:\n" + "\n".join(
        f"  {channel}: {form}: ...{excerpt!r}..."
        for channel, forms in hits.items()
        for form, excerpt in forms.items()
    )


def _chain(error: BaseException) -> Iterator[BaseException]:
    # Both links of each exception (a cause can carry a context of its own) and the
    # members of exception groups: everything a traceback printer would show.
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        link = pending.pop(0)
        if id(link) in seen:
            continue
        seen.add(id(link))
        yield link
        pending.extend(e for e in (link.__cause__, link.__context__) if e is not None)
        # Exception groups (Python 3.11+, or the exceptiongroup backport on 3.10).
        members = getattr(link, "exceptions", ())
        if isinstance(members, tuple):
            pending.extend(m for m in members if isinstance(m, BaseException))


def exception_channels(error: BaseException) -> dict[str, str]:
    """str, repr and .args of each exception in the chain, and the formatted traceback."""
    channels = {"traceback": "".join(traceback.format_exception(error))}
    for depth, link in enumerate(_chain(error)):
        name = f"exception[{depth}] {type(link).__name__}"
        channels[f"{name} str"] = str(link)
        channels[f"{name} repr"] = repr(link)
        channels[f"{name} args"] = repr(link.args)
    return channels
