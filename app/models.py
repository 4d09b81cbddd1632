"""Domain models of the reference service."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, MetaData, String, func
from sqlalchemy.orm import Mapped, mapped_column

from app.database import NAMING_CONVENTION, Base

NAME_MAX_LENGTH = 100
DESCRIPTION_MAX_LENGTH = 1000


class Model(Base):
    """The service's models: named constraints, as its migrations name them."""

    __abstract__ = True
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Item(Model):
    """A named thing in the catalogue; the name is unique."""

    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX_LENGTH), unique=True)
    description: Mapped[str | None] = mapped_column(String(DESCRIPTION_MAX_LENGTH))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
