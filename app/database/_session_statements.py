"""Which statements change session state: state that outlives the transaction.

Read from the statement's text, for two uses: a connection that ran one is reset
as it returns to the pool (`_session_state.py`), and behind a transaction pooler
one is refused before it is sent (`_pooler.py`). A `DO` block counts as one
whatever its body does: its body cannot be read reliably, and the reset it may
cost is rare. Not seen: state changed inside a function or procedure (README,
"Known limits").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Whitespace and comments before a statement's first word.
_LEAD = r"(?:\s+|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*"
# Statements whose effect outlives the transaction, by their first words. SET LOCAL,
# SET TRANSACTION and SET CONSTRAINTS end with the transaction: not counted. RESET,
# DISCARD and UNLISTEN move back towards a new session, which undoes what the
# service's connect-time setup did (a SET ROLE): counted, as "undo".
# CLOSE and DEALLOCATE of one name drop what the request itself made (DEALLOCATE ALL
# would also drop the driver's own statements: not handled, README "Known limits").
_SESSION_STATEMENT = re.compile(
    rf"(?:\A|;){_LEAD}(?:"
    r"(?P<set>SET)\s+(?!LOCAL\b|TRANSACTION\b|CONSTRAINTS\b)"
    r"|(?P<listen>LISTEN)\b|(?P<prepare>PREPARE)\b|(?P<declare>DECLARE)\b"
    r"|(?P<temp>CREATE\s+(?:OR\s+REPLACE\s+)?(?:(?:LOCAL|GLOBAL)\s+)?TEMP(?:ORARY)?)\b"
    r"|(?P<load>LOAD)\b|(?P<do>DO)\b|(?P<undo>RESET|DISCARD|UNLISTEN)\b)",
    re.IGNORECASE | re.DOTALL,
)
# A cheap first look: could the text start with one of those words (or a comment)?
_STARTS_WITH_KEYWORD = re.compile(
    r"\s*(?:set|listen|prepare|declare|create|load|do|reset|discard|unlisten|--|/\*)"
)
# Temporary tables made without the word TEMP at the start: SELECT ... INTO TEMP t,
# and anything created in the temporary schema by name (CREATE TABLE pg_temp.t).
# Not INSERT INTO / MERGE INTO (a table may be called temp), nor a mere reference to
# pg_temp.x after the name of what is created.
_TEMP_ANYWHERE = re.compile(
    r"(?<!insert\s)(?<!merge\s)\binto\s+(?:(?:local|global)\s+)?temp(?:orary)?\b"
    r'|(?<!insert\s)(?<!merge\s)\binto\s+(?:table\s+)?"?pg_temp(?:_\d+)?"?\s*\.'
    r"|\bcreate\s+(?:(?:or\s+replace|unlogged|materialized|unique)\s+)*"
    r"(?:table|view|sequence|function|procedure|type|domain)\s+"
    r'(?:if\s+not\s+exists\s+)?"?pg_temp(?:_\d+)?"?\s*\.',
    re.IGNORECASE | re.DOTALL,
)
# Functions with a session-level effect, anywhere in a statement (not the _xact_
# advisory locks, which end with the transaction).
_SESSION_FUNCTION = re.compile(
    r"\b(?:(?P<set_config>set_config)|(?P<advisory_lock>pg_(?:try_)?advisory_lock(?:_shared)?))"
    r"\s*\(",
    re.IGNORECASE,
)
# set_config's is_local argument written as a constant true: transaction-scoped.
# set_config(name, value, is_local): the third argument says whether it is LOCAL.
_SET_CONFIG_ARGUMENTS = 3
_TRUE = frozenset({"true", "'true'", "'t'", "'on'", "'yes'", "'1'", "true::boolean"})
# A cursor or temp table that ends with its transaction, though it is declared by
# a statement that can also make one outlive it.
_ENDS_WITH_TRANSACTION = {
    "declare": re.compile(r"\bwith\s+hold\b"),  # matched: it outlives the transaction
    "temp": re.compile(r"\bon\s+commit\s+drop\b"),  # matched: it does not
}


@dataclass(frozen=True)
class SessionEffect:
    """One construct in a statement that changes session state."""

    kind: str
    """"set", "set_config", "advisory_lock", "listen", "prepare", "declare", "temp", "load",
    "do" (may change anything), "undo" (RESET, DISCARD, UNLISTEN)."""
    outlives_transaction: bool
    """False for a cursor without WITH HOLD and a temp table ON COMMIT DROP."""

    @property
    def leaks(self) -> bool:
        """Whether it surely leaves state behind that another session would not have.

        Not a `DO` block, which may or may not, nor an "undo", which returns
        towards a new session's state: both still cost a reset here.
        """
        return self.outlives_transaction and self.kind not in ("do", "undo")

    @property
    def resettable(self) -> bool:
        """Whether a reset undoes it: a loaded library stays loaded until the session ends."""
        return self.kind != "load"


def session_effects(statement: str) -> list[SessionEffect]:
    """The constructs in `statement` that can change session state, in order."""
    # Runs for every statement: plain substring tests first, the regexes only on a hit.
    lowered = statement.lower()
    effects: list[SessionEffect] = []
    if _STARTS_WITH_KEYWORD.match(lowered) or ";" in lowered:
        for match in _SESSION_STATEMENT.finditer(lowered):
            kind = match.lastgroup or ""
            effects.append(SessionEffect(kind, _outlives(kind, lowered, match.end())))
    if "pg_temp" in lowered or ("temp" in lowered and "into" in lowered):
        for match in _TEMP_ANYWHERE.finditer(lowered):
            effects.append(SessionEffect("temp", _outlives("temp", lowered, match.end())))
    if "set_config" in lowered or "advisory_lock" in lowered:
        for match in _SESSION_FUNCTION.finditer(lowered):
            if match.group("set_config") and _is_local(lowered, match.end()):
                continue
            effects.append(SessionEffect(match.lastgroup or "", True))
    return effects


def _outlives(kind: str, statement: str, start: int) -> bool:
    check = _ENDS_WITH_TRANSACTION.get(kind)
    if check is None:
        return True
    end = statement.find(";", start)
    found = check.search(statement, start, len(statement) if end < 0 else end) is not None
    return found if kind == "declare" else not found


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
    return (
        len(arguments) == _SET_CONFIG_ARGUMENTS and " ".join(arguments[2].split()).lower() in _TRUE
    )
