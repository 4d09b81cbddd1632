"""Request and response bodies of the reference service."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator
from typing_extensions import Self

from app.models import DESCRIPTION_MAX_LENGTH, NAME_MAX_LENGTH

# PostgreSQL text cannot hold NUL: refuse it here (422) rather than at INSERT (500).
NO_NUL = r"^[^\x00]*$"
Name = Field(min_length=1, max_length=NAME_MAX_LENGTH, pattern=NO_NUL)
Description = Field(default=None, max_length=DESCRIPTION_MAX_LENGTH, pattern=NO_NUL)


class ItemCreate(BaseModel):
    """The body of POST /items, and one row of a batch import."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Name
    description: str | None = Description


class ItemUpdate(BaseModel):
    """A partial update: fields left out keep their value."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str | None = Field(default=None, min_length=1, max_length=NAME_MAX_LENGTH, pattern=NO_NUL)
    description: str | None = Description

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


class ItemPage(BaseModel):
    """One page of GET /items."""

    items: list[ItemRead]
    total: int
    offset: int
    limit: int
