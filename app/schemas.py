"""Request and response bodies of the reference service."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
from typing_extensions import Self

from app.models import DESCRIPTION_MAX_LENGTH, NAME_MAX_LENGTH

# PostgreSQL text cannot hold NUL: refuse it here (422) rather than at INSERT (500).
NO_NUL = r"^[^\x00]*$"

# The characters pydantic strips from both ends of a string (str_strip_whitespace),
# as a regex class: Unicode's White_Space, what Rust's str::trim removes. Python's
# str.strip() removes more (U+001C to U+001F), so it is not the reference.
STRIPPED = "\\t-\\r \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000"


def _text_as_sent(max_length: int, *, may_be_empty: bool, what: str) -> WithJsonSchema:
    """The JSON schema of a stripped text field, describing the text as the client sends it.

    The server strips the text and then checks its length, so minLength and maxLength
    (which count the whitespace around it) would refuse text it accepts, and accept
    text it refuses: a pattern bounds the stripped part instead.
    """
    kept = f"[^{STRIPPED}\\x00](?:[^\\x00]{{0,{max_length - 2}}}[^{STRIPPED}\\x00])?"
    if may_be_empty:
        kept = f"(?:{kept})?"
    shortest = 0 if may_be_empty else 1
    return WithJsonSchema(
        {
            "type": "string",
            "pattern": f"^[{STRIPPED}]*{kept}[{STRIPPED}]*$",
            "description": f"{what}: {shortest} to {max_length} characters once whitespace "
            "around it is stripped (which the server does), and no NUL",
        }
    )


NAME_SCHEMA = _text_as_sent(NAME_MAX_LENGTH, may_be_empty=False, what="The item's unique name")
DESCRIPTION_SCHEMA = _text_as_sent(DESCRIPTION_MAX_LENGTH, may_be_empty=True, what="Free text")
Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NO_NUL), NAME_SCHEMA]
Description = Annotated[
    str, Field(max_length=DESCRIPTION_MAX_LENGTH, pattern=NO_NUL), DESCRIPTION_SCHEMA
]


class ItemCreate(BaseModel):
    """The body of POST /items, and one row of a batch import."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: Name
    description: Description | None = None


def _no_defaults(schema: JsonDict) -> None:
    # A field left out of a PATCH keeps the item's value: null is no default of it.
    properties = schema["properties"]
    assert isinstance(properties, dict)
    for field in properties.values():
        assert isinstance(field, dict)
        field.pop("default", None)


class ItemUpdate(BaseModel):
    """A partial update: fields left out keep their value."""

    model_config = ConfigDict(
        extra="forbid", str_strip_whitespace=True, json_schema_extra=_no_defaults
    )

    # None stands for "left out" here; a client's null is refused, by the validator
    # below and by the schema, which (NAME_SCHEMA over the whole field) has no null.
    name: Annotated[Name | None, NAME_SCHEMA] = None
    description: Description | None = None

    @model_validator(mode="after")
    def _name_is_not_null(self) -> Self:
        if "name" in self.model_fields_set and self.name is None:
            raise ValueError("name cannot be null; leave it out to keep the current name")
        return self


class ItemRead(BaseModel):
    """An item as the API returns it."""

    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    description: str | None
    created_at: datetime

    @field_validator("created_at")
    @classmethod
    def _with_time_zone(cls, value: datetime) -> datetime:
        # SQLite (the demo) keeps no time zone: its CURRENT_TIMESTAMP is UTC. The
        # schema's date-time is RFC 3339's, which requires the offset.
        return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


class ItemPage(BaseModel):
    """One page of GET /items."""

    items: list[ItemRead]
    total: int
    offset: int
    limit: int


class ErrorBody(BaseModel):
    """The body of every error answer but a 422: what went wrong, in words.

    Never an exception's text, which may carry SQL, parameter values or host names.
    """

    detail: str
