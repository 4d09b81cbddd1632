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


@pytest.mark.parametrize(
    "params", [{"limit": 0}, {"limit": 101}, {"offset": -1}, {"offset": 10**20}]
)
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


async def test_patch_missing_item_is_404(client: httpx.AsyncClient) -> None:
    """PATCH of an id that does not exist answers 404."""
    response = await client.patch("/items/999999", json={"name": "x"})

    assert response.status_code == 404


async def test_patch_setting_name_to_null_is_422(client: httpx.AsyncClient) -> None:
    """The name can be left out of a PATCH, but not set to null."""
    item_id = await _create(client, "bolt")

    response = await client.patch(f"/items/{item_id}", json={"name": None})

    assert response.status_code == 422


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
@pytest.mark.parametrize("item_id", ["0", "-1", str(2**31), "99999999999999999999", "abc"])
async def test_out_of_range_ids_are_422(
    client: httpx.AsyncClient, method: str, item_id: str
) -> None:
    """Ids the integer column cannot hold are client errors, not server errors."""
    response = await client.request(method, f"/items/{item_id}", json={"name": "x"})

    assert response.status_code == 422


@pytest.mark.parametrize("field", ["name", "description"])
async def test_nul_character_is_422(client: httpx.AsyncClient, field: str) -> None:
    """PostgreSQL text cannot store NUL, so a body containing one is refused up front."""
    body = {"name": "ok", field: "a\u0000b"}

    response = await client.post("/items", json=body)

    assert response.status_code == 422


async def test_delete_removes_the_item(client: httpx.AsyncClient) -> None:
    """DELETE answers 204, after which the item is gone and a second DELETE is 404."""
    item_id = await _create(client, "glue")

    assert (await client.delete(f"/items/{item_id}")).status_code == 204
    assert (await client.get(f"/items/{item_id}")).status_code == 404
    assert (await client.delete(f"/items/{item_id}")).status_code == 404
