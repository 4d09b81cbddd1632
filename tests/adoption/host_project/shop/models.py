"""The service's models, on a DeclarativeBase of its own with default constraint names."""

from __future__ import annotations

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

EMAIL_MAX_LENGTH = 254


class Base(DeclarativeBase):
    """The service's own base: adopting the package leaves it, and its names, alone."""


class User(Base):
    __tablename__ = "shop_user"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(EMAIL_MAX_LENGTH), unique=True)


class Token(Base):
    __tablename__ = "shop_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("shop_user.id"))
