"""HTTP tests of the routes under /v1/sessions/{id}/messages: append, batch, page, read, clear."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
import pytest_asyncio

from chatsessions.api.idempotency import request_fingerprint
from chatsessions.config import Settings
from tests.api.support import (
    JSON,
    RunningApp,
    append,
    assert_problem,
    contents,
    create,
    fetch,
    problem_mismatch,
    running_app,
    snapshot,
)

pytestmark = pytest.mark.asyncio

MESSAGES = "/v1/sessions/s/messages"
BATCH = "/v1/sessions/s/messages/batch"


@pytest_asyncio.fixture
async def app(settings: Settings) -> AsyncIterator[RunningApp]:
    async with running_app(settings) as running:
        yield running


@pytest_asyncio.fixture
async def session(client: httpx.AsyncClient) -> dict[str, Any]:
    return await create(client, "s")


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


# --- POST /v1/sessions/{id}/messages ------------------------------------------------


@pytest.mark.usefixtures("session")
async def test_append_one(client: httpx.AsyncClient) -> None:
    message = {
        "role": "assistant",
        "content": "Paris.",
        "metadata": {"model": "m", "tokens": 3},
        "references": [{"doc_id": "d1", "page": 3}, {"doc_id": "d2", "section": "2.1"}],
    }
    response = await client.post(MESSAGES, json=message)

    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["location"] == "/v1/sessions/s/messages/1"
    assert response.headers["etag"] == '"2"'
    body = response.json()
    assert body["seq"] == 1
    assert {k: body[k] for k in message} == message
    assert body["created_at"].endswith("Z")

    assert (await client.get(response.headers["location"])).json() == body
    session = await fetch(client, "s")
    assert (session["message_count"], session["last_seq"], session["version"]) == (1, 1, 2)


@pytest.mark.usefixtures("session")
async def test_append_every_role(client: httpx.AsyncClient) -> None:
    for role in ("system", "user", "assistant", "tool"):
        response = await client.post(MESSAGES, json={"role": role, "content": "x"})
        assert response.status_code == 201
        assert response.json()["role"] == role
        assert (response.json()["metadata"], response.json()["references"]) == (None, None)


@pytest.mark.usefixtures("session")
async def test_appends_get_increasing_seqs(client: httpx.AsyncClient) -> None:
    for expected in (1, 2, 3):
        response = await client.post(MESSAGES, json=user(f"m{expected}"))
        assert response.json()["seq"] == expected
        assert response.headers["location"] == f"/v1/sessions/s/messages/{expected}"
        assert response.headers["etag"] == f'"{expected + 1}"'


async def test_missing_session_is_404_on_every_message_route(client: httpx.AsyncClient) -> None:
    await create(client, "other")
    await append(client, "other", "a")
    base = "/v1/sessions/missing/messages"
    failures = [
        problem_mismatch("append", await client.post(base, json=user("x")), 404),
        problem_mismatch("batch", await client.post(f"{base}/batch", json={"messages": [user("x")]}), 404),
        problem_mismatch("page", await client.get(base), 404),
        problem_mismatch("message", await client.get(f"{base}/1"), 404),
        problem_mismatch("clear", await client.delete(base), 404),
    ]
    assert [f for f in failures if f] == []
    assert_problem(await client.get("/v1/sessions/missing"), 404)


@pytest.mark.usefixtures("session")
async def test_append_if_match(client: httpx.AsyncClient) -> None:
    ok = await client.post(MESSAGES, json=user("a"), headers={"If-Match": '"1"'})
    assert ok.status_code == 201
    before = await snapshot(client, "s")

    assert_problem(await client.post(MESSAGES, json=user("b"), headers={"If-Match": '"1"'}), 412)
    assert await snapshot(client, "s") == before
    assert (await client.post(MESSAGES, json=user("b"), headers={"If-Match": '"2"'})).status_code == 201
    assert (await client.post(MESSAGES, json=user("c"), headers={"If-Match": "*"})).status_code == 201
    assert await contents(client, "s") == ["a", "b", "c"]


@pytest.mark.usefixtures("session")
async def test_concurrent_appends_over_http_lose_nothing(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(*(client.post(MESSAGES, json=user(f"c{i}")) for i in range(50)))

    assert {r.status_code for r in responses} == {201}
    acknowledged = {r.json()["content"]: r.json()["seq"] for r in responses}
    assert sorted(acknowledged.values()) == list(range(1, 51))
    page = (await client.get(MESSAGES, params={"limit": 1000})).json()["items"]
    assert {m["content"]: m["seq"] for m in page} == acknowledged
    assert (await fetch(client, "s"))["version"] == 51


# --- POST /v1/sessions/{id}/messages/batch --------------------------------------------


@pytest.mark.usefixtures("session")
async def test_batch(client: httpx.AsyncClient) -> None:
    await append(client, "s", "first")
    response = await client.post(BATCH, json={"messages": [user("a"), {"role": "assistant", "content": "b"}]})

    assert response.status_code == 201, response.text
    assert response.headers["etag"] == '"3"'
    items = response.json()["items"]
    assert [(m["seq"], m["role"], m["content"]) for m in items] == [(2, "user", "a"), (3, "assistant", "b")]
    session = await fetch(client, "s")
    assert (session["message_count"], session["last_seq"], session["version"]) == (3, 3, 3)


@pytest.mark.usefixtures("session")
async def test_batch_of_100_is_allowed(client: httpx.AsyncClient) -> None:
    response = await client.post(BATCH, json={"messages": [user(str(i)) for i in range(100)]})
    assert response.status_code == 201
    assert [m["seq"] for m in response.json()["items"]] == list(range(1, 101))


@pytest.mark.usefixtures("session")
async def test_batch_shape_errors_are_422(client: httpx.AsyncClient) -> None:
    before = await snapshot(client, "s")
    bodies: dict[str, Any] = {
        "empty": {"messages": []},
        "101": {"messages": [user(str(i)) for i in range(101)]},
        "no-messages": {},
        "object": {"messages": user("not a list")},
        "extra-field": {"messages": [user("a")], "extra": 1},
        "bare-list": [user("a")],
        "null": None,
    }
    failures = [problem_mismatch(name, await client.post(BATCH, json=body), 422) for name, body in bodies.items()]
    assert [f for f in failures if f] == []
    assert await snapshot(client, "s") == before


@pytest.mark.usefixtures("session")
async def test_batch_is_all_or_nothing(client: httpx.AsyncClient) -> None:
    await append(client, "s", "kept")
    before = await snapshot(client, "s")
    bad_messages: list[dict[str, Any]] = [
        {"role": "wizard", "content": "x"},
        {"role": "user"},
        {"content": "x"},
        {"role": "user", "content": 5},
        {"role": "user", "content": "x", "seq": 9},
        {"role": "user", "content": "x", "metadata": [1]},
        {"role": "user", "content": "x", "references": {"doc_id": "d"}},
        {"role": "user", "content": "x", "references": [1]},
    ]
    for bad in bad_messages:
        response = await client.post(BATCH, json={"messages": [user("a"), bad, user("c")]})
        body = assert_problem(response, 422)
        assert any(issue["loc"][:3] == ["body", "messages", 1] for issue in body["errors"]), (bad, body)
    assert await snapshot(client, "s") == before


@pytest.mark.usefixtures("session")
async def test_batch_if_match(client: httpx.AsyncClient) -> None:
    await append(client, "s", "a")
    before = await snapshot(client, "s")
    batch = {"messages": [user("b"), user("c")]}

    assert_problem(await client.post(BATCH, json=batch, headers={"If-Match": '"1"'}), 412)
    assert await snapshot(client, "s") == before
    response = await client.post(BATCH, json=batch, headers={"If-Match": '"2"'})
    assert response.status_code == 201
    assert response.headers["etag"] == '"3"'


# --- idempotent appends -------------------------------------------------------------------


@pytest.mark.usefixtures("session")
@pytest.mark.parametrize(
    ("path", "body"),
    [(MESSAGES, user("once")), (BATCH, {"messages": [user("once"), user("twice")]})],
    ids=["one", "batch"],
)
async def test_append_idempotent_replay(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
    headers = {"Idempotency-Key": "append-1"}
    first = await client.post(path, json=body, headers=headers)
    assert first.status_code == 201
    await append(client, "s", "between")
    second = await client.post(path, json=body, headers=headers)

    assert second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert second.content == first.content
    assert second.headers["etag"] == first.headers["etag"]
    assert second.headers.get("location") == first.headers.get("location")
    assert (await contents(client, "s")).count("once") == 1


@pytest.mark.usefixtures("session")
async def test_append_idempotency_key_with_another_body_is_422(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "k"}
    assert (await client.post(MESSAGES, json=user("a"), headers=headers)).status_code == 201
    before = await snapshot(client, "s")
    assert_problem(await client.post(MESSAGES, json=user("b"), headers=headers), 422)
    assert_problem(await client.post(BATCH, json={"messages": [user("a")]}, headers=headers), 422)
    assert await snapshot(client, "s") == before


@pytest.mark.usefixtures("session")
async def test_append_idempotency_key_length(client: httpx.AsyncClient) -> None:
    before = await snapshot(client, "s")
    failures = []
    for path, body in ((MESSAGES, user("x")), (BATCH, {"messages": [user("x")]})):
        for key in ("", "k" * 256):
            response = await client.post(path, json=body, headers={"Idempotency-Key": key})
            failures.append(problem_mismatch(f"{path} key of {len(key)}", response, 422))
    assert [f for f in failures if f] == []
    assert await snapshot(client, "s") == before

    response = await client.post(MESSAGES, json=user("x"), headers={"Idempotency-Key": "k" * 255})
    assert response.status_code == 201


async def test_append_idempotency_replays_a_404(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "early"}
    first = await client.post("/v1/sessions/late/messages", json=user("x"), headers=headers)
    assert_problem(first, 404)
    await create(client, "late")

    replay = await client.post("/v1/sessions/late/messages", json=user("x"), headers=headers)
    assert_problem(replay, 404)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert await contents(client, "late") == []


async def test_append_idempotency_replays_a_412(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    headers = {"Idempotency-Key": "k", "If-Match": '"7"'}
    first = await client.post(MESSAGES, json=user("x"), headers=headers)
    assert_problem(first, 412)
    replay = await client.post(MESSAGES, json=user("x"), headers=headers)
    assert_problem(replay, 412)
    assert replay.headers["idempotent-replayed"] == "true"
    assert await contents(client, "s") == []


async def test_append_idempotency_keys_are_per_key(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    for key in ("k1", "k2", "K1"):
        assert (await client.post(MESSAGES, json=user("same"), headers={"Idempotency-Key": key})).status_code == 201
    assert await contents(client, "s") == ["same"] * 3


async def test_append_idempotency_key_in_progress_is_409(app: RunningApp) -> None:
    await create(app.client, "s")
    body = json.dumps(user("x")).encode()
    # Stand in for a first request still running: claim the key under the fingerprint the route computes.
    fingerprint = request_fingerprint("POST", MESSAGES, body)
    assert await app.repository.idempotency_begin("default", "busy", fingerprint) is None

    response = await app.client.post(MESSAGES, content=body, headers={**JSON, "Idempotency-Key": "busy"})
    assert_problem(response, 409)
    assert await contents(app.client, "s") == []


async def test_racing_idempotent_appends_append_once(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    headers = {"Idempotency-Key": "race"}
    responses = await asyncio.gather(*(client.post(MESSAGES, json=user("x"), headers=headers) for _ in range(10)))

    assert {r.status_code for r in responses} <= {201, 409}
    created = [r for r in responses if r.status_code == 201]
    assert created
    assert len({r.content for r in created}) == 1
    assert await contents(client, "s") == ["x"]


# --- GET /v1/sessions/{id}/messages ------------------------------------------------------


@pytest_asyncio.fixture
async def ten(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    await append(client, "s", *(f"m{i}" for i in range(1, 11)))


PAGES: list[tuple[dict[str, Any], list[int], bool]] = [
    ({}, list(range(1, 11)), False),
    ({"limit": 3}, [1, 2, 3], True),
    ({"limit": 10}, list(range(1, 11)), False),
    ({"limit": 9}, list(range(1, 10)), True),
    ({"after": 7}, [8, 9, 10], False),
    ({"after": 6, "limit": 3}, [7, 8, 9], True),
    ({"after": 7, "limit": 3}, [8, 9, 10], False),
    ({"before": 4}, [1, 2, 3], False),
    ({"before": 4, "limit": 2}, [1, 2], True),
    ({"after": 2, "before": 6}, [3, 4, 5], False),
    ({"after": 2, "before": 6, "limit": 2}, [3, 4], True),
    ({"after": 2, "before": 6, "limit": 3}, [3, 4, 5], False),
    ({"order": "asc", "limit": 2}, [1, 2], True),
    ({"order": "desc"}, list(range(10, 0, -1)), False),
    ({"order": "desc", "limit": 3}, [10, 9, 8], True),
    ({"order": "desc", "before": 4, "limit": 3}, [3, 2, 1], False),
    ({"order": "desc", "before": 5, "limit": 3}, [4, 3, 2], True),
    ({"order": "desc", "after": 7, "limit": 3}, [10, 9, 8], False),
    ({"order": "desc", "after": 6, "limit": 3}, [10, 9, 8], True),
    ({"after": 10}, [], False),
    ({"after": 5, "before": 6}, [], False),
    ({"before": 1}, [], False),
    ({"after": 0}, list(range(1, 11)), False),
    ({"limit": 1000}, list(range(1, 11)), False),
]


@pytest.mark.usefixtures("ten")
async def test_list_messages(client: httpx.AsyncClient) -> None:
    failures = []
    for params, seqs, has_more in PAGES:
        response = await client.get(MESSAGES, params=params)
        assert response.status_code == 200, (params, response.text)
        page = response.json()
        assert set(page) == {"items", "has_more"}
        got = ([m["seq"] for m in page["items"]], page["has_more"])
        if got != (seqs, has_more):
            failures.append(f"{params}: expected {(seqs, has_more)}, got {got}")
        assert [m["content"] for m in page["items"]] == [f"m{s}" for s in got[0]]
    assert failures == []


@pytest.mark.usefixtures("ten")
async def test_list_messages_bad_params_are_422(client: httpx.AsyncClient) -> None:
    cases: list[dict[str, Any]] = [
        {"limit": 0},
        {"limit": 1001},
        {"limit": -1},
        {"limit": "x"},
        {"order": "sideways"},
        {"order": "DESC"},
        {"after": -1},
        {"after": "x"},
        {"before": -1},
        {"before": "1.5"},
        {"after": 2**63},
    ]
    failures = [problem_mismatch(str(params), await client.get(MESSAGES, params=params), 422) for params in cases]
    assert [f for f in failures if f] == []


async def test_list_messages_default_limit_is_100(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    await append(client, "s", *(str(i) for i in range(100)))
    await append(client, "s", "101st")
    page = (await client.get(MESSAGES)).json()
    assert len(page["items"]) == 100
    assert page["has_more"] is True


# --- GET /v1/sessions/{id}/messages/{seq} ---------------------------------------------------


@pytest.mark.usefixtures("ten")
async def test_get_message(client: httpx.AsyncClient) -> None:
    response = await client.get(f"{MESSAGES}/4")
    assert response.status_code == 200
    assert (response.json()["seq"], response.json()["content"]) == (4, "m4")

    failures = [problem_mismatch(seq, await client.get(f"{MESSAGES}/{seq}"), 404) for seq in ("11", "999")]
    failures += [
        problem_mismatch(seq, await client.get(f"{MESSAGES}/{seq}"), 422) for seq in ("0", "-1", "x", "1.5", str(2**63))
    ]
    assert [f for f in failures if f] == []


# --- DELETE /v1/sessions/{id}/messages ------------------------------------------------------


@pytest.mark.usefixtures("ten")
async def test_clear(client: httpx.AsyncClient) -> None:
    before = await fetch(client, "s")
    response = await client.delete(MESSAGES)

    assert response.status_code == 204
    assert response.content == b""
    assert response.headers["etag"] == f'"{before["version"] + 1}"'
    after = await fetch(client, "s")
    assert (after["message_count"], after["last_seq"], after["version"]) == (0, 10, before["version"] + 1)
    assert datetime.fromisoformat(after["updated_at"]) > datetime.fromisoformat(before["updated_at"])
    assert (await client.get(MESSAGES)).json() == {"items": [], "has_more": False}
    assert_problem(await client.get(f"{MESSAGES}/1"), 404)

    appended = await client.post(MESSAGES, json=user("fresh"))
    assert appended.json()["seq"] == 11
    assert appended.headers["location"] == "/v1/sessions/s/messages/11"
    page = (await client.get(MESSAGES, params={"after": 5})).json()
    assert [m["seq"] for m in page["items"]] == [11]


@pytest.mark.usefixtures("ten")
async def test_clear_if_match(client: httpx.AsyncClient) -> None:
    before = await snapshot(client, "s")
    assert_problem(await client.delete(MESSAGES, headers={"If-Match": '"1"'}), 412)
    assert await snapshot(client, "s") == before
    response = await client.delete(MESSAGES, headers={"If-Match": f'"{before[0]["version"]}"'})
    assert response.status_code == 204
