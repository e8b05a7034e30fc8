"""`GET /v1/search`, `GET /v1/citations` and `?cited_doc_id=` over HTTP (the store's rules are in the contract)."""

from __future__ import annotations

import httpx
import pytest

from tests.api.support import append, assert_problem, create

pytestmark = pytest.mark.asyncio


async def test_search_over_http_pages_with_an_opaque_cursor(client: httpx.AsyncClient) -> None:
    await create(client, "s", user_id="u")
    await append(client, "s", *[f"Ünïcode walrus {i}" for i in range(5)], "no match here")
    first = await client.get("/v1/search", params={"q": "WALRUS unicode", "limit": 2})
    assert first.status_code == 200, first.text
    body = first.json()
    assert len(body["items"]) == 2
    assert set(body["items"][0]) == {"session_id", "seq", "role", "created_at", "snippet"}
    seen = [hit["seq"] for hit in body["items"]]
    cursor = body["next_cursor"]
    while cursor is not None:
        page = await client.get("/v1/search", params={"q": "WALRUS unicode", "limit": 2, "cursor": cursor})
        assert page.status_code == 200, page.text
        seen += [hit["seq"] for hit in page.json()["items"]]
        cursor = page.json()["next_cursor"]
    assert sorted(seen) == [1, 2, 3, 4, 5]
    filtered = await client.get("/v1/search", params={"q": "walrus", "user_id": "other"})
    assert filtered.json() == {"items": [], "next_cursor": None}


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"q": ""},
        {"q": "x" * 257},
        {"q": '"*" ^ : ( )'},
        {"q": "a", "limit": 0},
        {"q": "a", "limit": 101},
        {"q": "a", "role": "robot"},
        {"q": "a", "cursor": "not-a-cursor"},
        {"q": "a", "cursor": "WyJ4Il0"},  # ["x"]: a list, but no offset
        {"q": "a", "cursor": "Wy0xXQ"},  # [-1]
    ],
)
async def test_bad_searches_are_422(client: httpx.AsyncClient, params: dict[str, str | int]) -> None:
    assert_problem(await client.get("/v1/search", params=params), 422)


@pytest.mark.parametrize("q", ["NEAR(a b)", "a*", "^a", "a:b", '"open', "a OR b", "-a", "{a}"])
async def test_search_syntax_never_fails(client: httpx.AsyncClient, q: str) -> None:
    response = await client.get("/v1/search", params={"q": q})
    assert response.status_code == 200, response.text


async def test_citations_over_http(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    for i in range(3):
        response = await client.post(
            "/v1/sessions/s/messages",
            json={"role": "assistant", "content": f"answer {i}", "references": [{"doc_id": "spec", "page": i}]},
        )
        assert response.status_code == 201, response.text
    first = await client.get("/v1/citations", params={"doc_id": "spec", "limit": 2})
    assert first.status_code == 200, first.text
    assert [(c["seq"], c["reference"]["page"]) for c in first.json()["items"]] == [(3, 2), (2, 1)]
    rest = await client.get("/v1/citations", params={"doc_id": "spec", "cursor": first.json()["next_cursor"]})
    assert [(c["seq"], c["reference"]) for c in rest.json()["items"]] == [(1, {"doc_id": "spec", "page": 0})]
    assert rest.json()["next_cursor"] is None
    sessions = await client.get("/v1/sessions", params={"cited_doc_id": "spec"})
    assert [s["id"] for s in sessions.json()["items"]] == ["s"]
    assert (await client.get("/v1/sessions", params={"cited_doc_id": "nope"})).json()["items"] == []
    assert_problem(await client.get("/v1/citations"), 422)
    assert_problem(await client.get("/v1/citations", params={"doc_id": ""}), 422)
    assert_problem(await client.get("/v1/citations", params={"doc_id": "spec", "cursor": "WzFd"}), 422)
