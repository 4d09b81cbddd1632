"""CRUD routes for items: the reference for writing route code on the package."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from app.database import AsyncSessionDep, ReadSessionDep, RetryingRoute
from app.errors import DATABASE_ERROR_RESPONSES
from app.models import Item
from app.schemas import ErrorBody, ItemCreate, ItemPage, ItemRead, ItemUpdate

# A deadlock or serialization failure runs the request again, up to 3 times, before
# the client sees a 503: these routes touch nothing outside the database. Every
# route can answer 503 or 504 for the database; FastAPI documents each 422.
router = APIRouter(
    prefix="/items",
    tags=["items"],
    route_class=RetryingRoute,
    responses=DATABASE_ERROR_RESPONSES,
)

# The other answers a route can give, listed on each route that gives them.
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No item has this id."}
}
NAME_TAKEN: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "Another item has this name: nothing was changed."}
}
# FastAPI's answer to a body it cannot read as text (not UTF-8, UTF-16 or UTF-32);
# text that is not JSON is a 422.
UNREADABLE_BODY: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "The body could not be decoded."}
}

MAX_PAGE_SIZE = 100
# The id column is a 32-bit integer: a larger id is a client error (422), not a 500.
ItemId = Annotated[int, Path(ge=1, le=2**31 - 1)]


async def _get_or_404(db: AsyncSession, item_id: int) -> Item:
    item = await db.get(Item, item_id)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"item {item_id} not found")
    return item


def _is_duplicate_name(error: IntegrityError) -> bool:
    # PostgreSQL names the constraint, SQLite the column; any other violation is a bug
    # that must surface as a 500, not be reported as a conflict.
    message = str(error.orig)
    return "uq_items_name" in message or "items.name" in message


async def _flush_or_409(db: AsyncSession, name: str) -> None:
    # The unique constraint, not a prior SELECT, decides: a SELECT would race.
    # Raising rolls the whole request back (the dependency sees the exception).
    try:
        await db.flush()
    except IntegrityError as error:
        if not _is_duplicate_name(error):
            raise
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"an item named {name!r} already exists"
        ) from None


# GETs read through ReadSessionDep: one round trip per statement, on a replica when
# one is configured and has replayed the client's last write.
@router.get("")
async def list_items(
    db: ReadSessionDep,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 20,
) -> ItemPage:
    """A page of items in id order, with the total count."""
    total = await db.scalar(select(func.count()).select_from(Item))
    rows = await db.scalars(select(Item).order_by(Item.id).offset(offset).limit(limit))
    return ItemPage(
        items=[ItemRead.model_validate(item) for item in rows],
        total=total or 0,
        offset=offset,
        limit=limit,
    )


@router.get("/{item_id}", responses=NOT_FOUND)
async def get_item(db: ReadSessionDep, item_id: ItemId) -> ItemRead:
    """One item by id."""
    return ItemRead.model_validate(await _get_or_404(db, item_id))


@router.post("", status_code=status.HTTP_201_CREATED, responses={**NAME_TAKEN, **UNREADABLE_BODY})
async def create_item(db: AsyncSessionDep, body: ItemCreate) -> ItemRead:
    """Create an item; names are unique."""
    item = Item(name=body.name, description=body.description)
    db.add(item)
    await _flush_or_409(db, body.name)
    # created_at is set by the server: load it while the session is still open.
    await db.refresh(item)
    return ItemRead.model_validate(item)


@router.patch("/{item_id}", responses={**NOT_FOUND, **NAME_TAKEN, **UNREADABLE_BODY})
async def update_item(db: AsyncSessionDep, item_id: ItemId, body: ItemUpdate) -> ItemRead:
    """Change the fields given in the body; the others keep their value."""
    item = await _get_or_404(db, item_id)
    for field, value in body.model_dump(exclude_unset=True).items():
        setattr(item, field, value)
    await _flush_or_409(db, item.name)
    return ItemRead.model_validate(item)


@router.delete("/{item_id}", status_code=status.HTTP_204_NO_CONTENT, responses=NOT_FOUND)
async def delete_item(db: AsyncSessionDep, item_id: ItemId) -> Response:
    """Delete an item."""
    await db.delete(await _get_or_404(db, item_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
