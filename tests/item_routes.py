"""The reference service's item routes, as scenarios shared by every backend.

Not collected here (the file name does not start with test_): the PostgreSQL and
SQLite suites import these tests, and each runs them with its own `client`.
"""

from __future__ import annotations

import httpx
import pytest


async def _create(client: httpx.AsyncClient, name: str, description: str | None = None) -> int:
    response = await client.post("/items", json={"name": name, "description": description})
    assert response.status_code == 201, response.text
    item_id: int = response.json()["id"]
    return item_id


async def test_create_then_get_returns_the_item(client: httpx.AsyncClient) -> None:
    """A created item is returned by GET with its server-set fields."""
    item_id = await _create(client, "hammer", "claw")

    response = await client.get(f"/items/{item_id}")

    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["description"]) == ("hammer", "claw")
    assert body["created_at"]


async def test_get_missing_item_is_404(client: httpx.AsyncClient) -> None:
    """GET of an id that does not exist answers 404."""
    response = await client.get("/items/999999")

    assert response.status_code == 404
    assert response.json() == {"detail": "item 999999 not found"}


async def test_create_duplicate_name_is_409_and_keeps_the_first(
    client: httpx.AsyncClient,
) -> None:
    """A second item with the same name answers 409 and the first is unchanged."""
    first = await _create(client, "saw", "first")

    response = await client.post("/items", json={"name": "saw", "description": "second"})

    assert response.status_code == 409
    assert "already exists" in response.json()["detail"]
    assert (await client.get(f"/items/{first}")).json()["description"] == "first"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": ""},
        {"name": "x" * 101},
        {"name": "ok", "description": "d" * 1001},
        {"name": "ok", "colour": "red"},
        {"name": 5},
    ],
)
async def test_create_with_bad_body_is_422(
    client: httpx.AsyncClient, body: dict[str, object]
) -> None:
    """Invalid bodies are refused with 422 before any database work."""
    response = await client.post("/items", json=body)

    assert response.status_code == 422


async def test_list_paginates_in_id_order(client: httpx.AsyncClient) -> None:
    """offset and limit page through items in creation order, with the total."""
    for n in range(5):
        await _create(client, f"item-{n}")

    response = await client.get("/items", params={"offset": 1, "limit": 2})

    assert response.status_code == 200
    body = response.json()
    assert [item["name"] for item in body["items"]] == ["item-1", "item-2"]
    assert (body["total"], body["offset"], body["limit"]) == (5, 1, 2)


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 101}, {"offset": -1}])
async def test_list_rejects_bad_paging_with_422(
    client: httpx.AsyncClient, params: dict[str, int]
) -> None:
    """Out-of-range paging parameters are refused with 422."""
    response = await client.get("/items", params=params)

    assert response.status_code == 422


async def test_patch_changes_only_given_fields(client: httpx.AsyncClient) -> None:
    """PATCH updates the fields present in the body and keeps the others."""
    item_id = await _create(client, "drill", "cordless")

    response = await client.patch(f"/items/{item_id}", json={"description": "corded"})

    assert response.status_code == 200
    assert (response.json()["name"], response.json()["description"]) == ("drill", "corded")
    assert (await client.get(f"/items/{item_id}")).json()["description"] == "corded"


async def test_patch_to_an_existing_name_is_409_and_changes_nothing(
    client: httpx.AsyncClient,
) -> None:
    """Renaming onto another item's name answers 409 and rolls the change back."""
    await _create(client, "nail")
    screw = await _create(client, "screw", "wood")

    response = await client.patch(f"/items/{screw}", json={"name": "nail", "description": "x"})

    assert response.status_code == 409
    body = (await client.get(f"/items/{screw}")).json()
    assert (body["name"], body["description"]) == ("screw", "wood")


@pytest.mark.parametrize(("item_id", "body"), [(999999, {"name": "x"}), (None, {"name": None})])
async def test_patch_missing_or_null_name(
    client: httpx.AsyncClient, item_id: int | None, body: dict[str, object]
) -> None:
    """PATCH of a missing item is 404; setting the name to null is 422."""
    target = item_id if item_id is not None else await _create(client, "bolt")

    response = await client.patch(f"/items/{target}", json=body)

    assert response.status_code == (404 if item_id is not None else 422)


async def test_delete_removes_the_item(client: httpx.AsyncClient) -> None:
    """DELETE answers 204, after which the item is gone and a second DELETE is 404."""
    item_id = await _create(client, "glue")

    assert (await client.delete(f"/items/{item_id}")).status_code == 204
    assert (await client.get(f"/items/{item_id}")).status_code == 404
    assert (await client.delete(f"/items/{item_id}")).status_code == 404
