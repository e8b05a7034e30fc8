"""HTTP tests of the routes under /v1/sessions that act on sessions as a whole."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
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
    MERGE_PATCH,
    RunningApp,
    append,
    assert_problem,
    create,
    fetch,
    problem_mismatch,
    running_app,
    snapshot,
)

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def app(settings: Settings) -> AsyncIterator[RunningApp]:
    async with running_app(settings) as running:
        yield running


def parse_time(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value)


# --- POST /v1/sessions ---------------------------------------------------------


async def test_create_without_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/sessions")

    assert response.status_code == 201
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert uuid.UUID(body["id"]).version == 4
    assert response.headers["location"] == f"/v1/sessions/{body['id']}"
    assert response.headers["etag"] == '"1"'
    assert body["version"] == 1
    assert (body["message_count"], body["last_seq"]) == (0, 0)
    assert body["metadata"] == {}
    assert body["created_at"] == body["updated_at"]
    parse_time(body["created_at"])
    assert await fetch(client, body["id"]) == body

    response = await client.post("/v1/sessions", json={})
    assert response.status_code == 201
    assert uuid.UUID(response.json()["id"]).version == 4
    assert response.json()["id"] != body["id"]


async def test_create_with_every_field(client: httpx.AsyncClient) -> None:
    fields = {
        "id": "chat-1",
        "user_id": "u1",
        "document_id": "doc-9",
        "section_id": "s2",
        "title": "Questions about §2",
        "settings": {"model": "m", "mode": "rag", "options": {"temperature": 0.1}, "top_k": 5},
        "metadata": {"source": "web", "tags": ["a", "b"]},
    }
    response = await client.post("/v1/sessions", json=fields)

    assert response.status_code == 201
    assert response.headers["location"] == "/v1/sessions/chat-1"
    assert response.headers["etag"] == '"1"'
    body = response.json()
    for key, value in fields.items():
        assert body[key] == value
    assert await fetch(client, "chat-1") == body


async def test_create_existing_id_is_409_and_keeps_the_original(client: httpx.AsyncClient) -> None:
    original = await create(client, "dup", title="first")
    response = await client.post("/v1/sessions", json={"id": "dup", "title": "second"})
    assert_problem(response, 409)
    assert await fetch(client, "dup") == original


SERVER_OWNED: list[dict[str, Any]] = [
    {"id": "other"},
    {"seq": 1},
    {"version": 9},
    {"message_count": 9},
    {"last_seq": 9},
    {"created_at": "2020-01-01T00:00:00Z"},
    {"updated_at": "2020-01-01T00:00:00Z"},
    {"tenant": "other"},
    {"unknown": 1},
]


async def test_create_with_server_owned_field_is_422_and_creates_nothing(client: httpx.AsyncClient) -> None:
    failures = []
    for field in SERVER_OWNED:
        if "id" not in field:
            response = await client.post("/v1/sessions", json={"id": "s", **field})
            failures.append(problem_mismatch(f"POST {field}", response, 422))
        failures.append(problem_mismatch(f"PUT {field}", await client.put("/v1/sessions/s", json=field), 422))
    assert [f for f in failures if f] == []
    assert_problem(await client.get("/v1/sessions/s"), 404)
    assert (await client.get("/v1/sessions")).json()["items"] == []


async def test_create_idempotent_replay(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "create-1"}
    first = await client.post("/v1/sessions", json={"title": "t"}, headers=headers)
    second = await client.post("/v1/sessions", json={"title": "t"}, headers=headers)

    assert first.status_code == second.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert second.headers["location"] == first.headers["location"]
    assert second.headers["etag"] == first.headers["etag"]
    assert len((await client.get("/v1/sessions")).json()["items"]) == 1


async def test_create_idempotency_key_with_another_body_is_422(client: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": "create-1"}
    assert (await client.post("/v1/sessions", json={"title": "a"}, headers=headers)).status_code == 201
    assert_problem(await client.post("/v1/sessions", json={"title": "b"}, headers=headers), 422)
    assert [s["title"] for s in (await client.get("/v1/sessions")).json()["items"]] == ["a"]


async def test_create_idempotency_replays_a_409(client: httpx.AsyncClient) -> None:
    await create(client, "taken")
    headers = {"Idempotency-Key": "k"}
    first = await client.post("/v1/sessions", json={"id": "taken"}, headers=headers)
    assert_problem(first, 409)
    assert (await client.delete("/v1/sessions/taken")).status_code == 204

    replay = await client.post("/v1/sessions", json={"id": "taken"}, headers=headers)
    assert_problem(replay, 409)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert_problem(await client.get("/v1/sessions/taken"), 404)


async def test_create_idempotency_key_in_progress_is_409(app: RunningApp) -> None:
    body = json.dumps({"title": "t"}).encode()
    # Stand in for a first request still running: claim the key under the fingerprint the route computes.
    fingerprint = request_fingerprint("POST", "/v1/sessions", body)
    assert await app.repository.idempotency_begin("default", "busy", fingerprint) is None

    response = await app.client.post("/v1/sessions", content=body, headers={**JSON, "Idempotency-Key": "busy"})
    assert_problem(response, 409)
    assert (await app.client.get("/v1/sessions")).json()["items"] == []

    await app.repository.idempotency_finish("default", "busy", None)
    response = await app.client.post("/v1/sessions", content=body, headers={**JSON, "Idempotency-Key": "busy"})
    assert response.status_code == 201


async def test_create_idempotency_key_length(client: httpx.AsyncClient) -> None:
    for key in ("", "k" * 256):
        assert_problem(await client.post("/v1/sessions", json={}, headers={"Idempotency-Key": key}), 422)
    assert (await client.get("/v1/sessions")).json()["items"] == []
    response = await client.post("/v1/sessions", json={}, headers={"Idempotency-Key": "k" * 255})
    assert response.status_code == 201


# --- PUT /v1/sessions/{id} -----------------------------------------------------


async def test_put_creates_then_returns_existing_unchanged(client: httpx.AsyncClient) -> None:
    first = await client.put("/v1/sessions/p1", json={"title": "first", "user_id": "u"})
    assert first.status_code == 201
    assert first.headers["location"] == "/v1/sessions/p1"
    assert first.headers["etag"] == '"1"'
    assert (first.json()["id"], first.json()["title"], first.json()["user_id"]) == ("p1", "first", "u")

    second = await client.put("/v1/sessions/p1", json={"title": "second"})
    assert second.status_code == 200
    assert second.headers["etag"] == '"1"'
    assert second.json() == first.json()
    assert await fetch(client, "p1") == first.json()

    response = await client.put("/v1/sessions/p2")
    assert response.status_code == 201
    assert (response.json()["id"], response.json()["version"]) == ("p2", 1)


async def test_put_existing_returns_current_state(client: httpx.AsyncClient) -> None:
    await create(client, "p1")
    await append(client, "p1", "hello")
    response = await client.put("/v1/sessions/p1", json={"title": "ignored"})
    assert response.status_code == 200
    assert response.headers["etag"] == '"2"'
    assert (response.json()["message_count"], response.json()["title"]) == (1, None)


async def test_put_body_has_no_id(client: httpx.AsyncClient) -> None:
    for body_id in ("other", "p1"):
        body = assert_problem(await client.put("/v1/sessions/p1", json={"id": body_id}), 422)
        assert [(i["loc"], i["type"]) for i in body["errors"]] == [(["body", "id"], "extra_forbidden")]
    assert_problem(await client.get("/v1/sessions/p1"), 404)
    assert_problem(await client.get("/v1/sessions/other"), 404)
    assert (await client.put("/v1/sessions/p1", json={"title": "t"})).status_code == 201


async def test_racing_puts_create_exactly_once(client: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(*(client.put("/v1/sessions/race", json={"title": f"t{i}"}) for i in range(20)))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 19 + [201]
    assert len({r.content for r in responses}) == 1
    listed = (await client.get("/v1/sessions")).json()["items"]
    assert [s["id"] for s in listed] == ["race"]


# --- GET /v1/sessions/{id} -----------------------------------------------------


async def test_get_has_etag_of_current_version(client: httpx.AsyncClient) -> None:
    await create(client, "g")
    await append(client, "g", "a")
    response = await client.get("/v1/sessions/g")
    assert response.status_code == 200
    assert response.headers["etag"] == '"2"'
    assert response.json()["version"] == 2

    body = assert_problem(await client.get("/v1/sessions/missing"), 404)
    assert "missing" in body["detail"]


# --- GET /v1/sessions -------------------------------------------------------------


async def test_list_empty(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/sessions")
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}


async def test_list_newest_first(client: httpx.AsyncClient) -> None:
    for session_id in ("a", "b", "c"):
        await create(client, session_id)
    await append(client, "a", "bump")

    items = (await client.get("/v1/sessions")).json()["items"]
    assert items[0]["id"] == "a"
    keys = [(-parse_time(s["updated_at"]).timestamp(), s["id"]) for s in items]
    assert keys == sorted(keys)
    assert sorted(s["id"] for s in items) == ["a", "b", "c"]


async def test_list_default_limit_is_20(client: httpx.AsyncClient) -> None:
    for i in range(21):
        await create(client, f"s{i:02}")
    page = (await client.get("/v1/sessions")).json()
    assert len(page["items"]) == 20
    assert page["next_cursor"] is not None


async def test_list_cursor_pages_cover_everything_once(client: httpx.AsyncClient) -> None:
    ids = [f"s{i:02}" for i in range(11)]
    for session_id in ids:
        await create(client, session_id)

    seen: list[str] = []
    params: dict[str, str | int] = {"limit": 3}
    pages = 0
    while True:
        response = await client.get("/v1/sessions", params=params)
        assert response.status_code == 200
        page = response.json()
        pages += 1
        seen.extend(s["id"] for s in page["items"])
        if page["next_cursor"] is None:
            break
        assert isinstance(page["next_cursor"], str)
        params = {"limit": 3, "cursor": page["next_cursor"]}
    assert pages == 4
    assert sorted(seen) == ids
    assert len(seen) == len(set(seen))


async def test_list_filters(client: httpx.AsyncClient) -> None:
    await create(client, "a", user_id="u1", document_id="d1", section_id="x")
    await create(client, "b", user_id="u1", document_id="d2")
    await create(client, "c", user_id="u2", document_id="d1", section_id="x")

    async def ids(**params: str) -> list[str]:
        response = await client.get("/v1/sessions", params=params)
        assert response.status_code == 200
        return sorted(s["id"] for s in response.json()["items"])

    assert await ids(user_id="u1") == ["a", "b"]
    assert await ids(document_id="d1") == ["a", "c"]
    assert await ids(section_id="x") == ["a", "c"]
    assert await ids(user_id="u1", document_id="d1") == ["a"]
    assert await ids(user_id="u2", section_id="x", document_id="d1") == ["c"]
    assert await ids(user_id="nobody") == []


async def test_list_filtered_paging(client: httpx.AsyncClient) -> None:
    for i in range(7):
        await create(client, f"s{i}", user_id="u1" if i % 2 else "u2")
    first = (await client.get("/v1/sessions", params={"user_id": "u1", "limit": 2})).json()
    second = (
        await client.get("/v1/sessions", params={"user_id": "u1", "limit": 2, "cursor": first["next_cursor"]})
    ).json()
    assert second["next_cursor"] is None
    assert sorted(s["id"] for s in first["items"] + second["items"]) == ["s1", "s3", "s5"]


async def test_list_limit_out_of_range_is_422(client: httpx.AsyncClient) -> None:
    failures = [
        problem_mismatch(f"limit={limit}", await client.get("/v1/sessions", params={"limit": limit}), 422)
        for limit in ("0", "101", "-1", "abc", "1.5", "")
    ]
    for name in ("user_id", "document_id", "section_id"):
        response = await client.get("/v1/sessions", params={name: "u" * 1025})
        failures.append(problem_mismatch(f"{name} of 1025 characters", response, 422))
    assert [f for f in failures if f] == []


async def test_list_limit_bounds_are_allowed(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    await create(client, "b")
    for limit in (1, 2, 100):
        page = (await client.get("/v1/sessions", params={"limit": limit})).json()
        assert len(page["items"]) == min(limit, 2)
        assert (page["next_cursor"] is None) is (limit >= 2)


def _token(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def test_list_foreign_cursor_is_422(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    cursors = [
        "!!!",
        "not-a-cursor",
        _token(["not a time", "a"]),
        _token([1, "a"]),
        _token([]),
        _token(None),
        _token({"a": 1}),
        _token(["2024-01-01T00:00:00Z"]),
        _token(["2024-01-01T00:00:00Z", "a", "extra"]),
        "x" * 2049,
    ]
    failures = [
        problem_mismatch(cursor[:40], await client.get("/v1/sessions", params={"cursor": cursor}), 422)
        for cursor in cursors
    ]
    assert [f for f in failures if f] == []


async def test_list_odd_but_decodable_cursor_never_fails(client: httpx.AsyncClient) -> None:
    await create(client, "a")
    failures = []
    for value in (
        ["2024-01-01T00:00:00", "a"],
        ["2024-01-01T00:00:00+05:00", 7],
        ["9999-12-31", "z"],
        ["0001-01-01", "a"],
    ):
        response = await client.get("/v1/sessions", params={"cursor": _token(value)})
        if response.status_code != 200:
            failures.append(problem_mismatch(str(value), response, 422))
    assert [f for f in failures if f] == []


# --- PATCH /v1/sessions/{id} -------------------------------------------------------


@pytest.mark.parametrize("headers", [MERGE_PATCH, JSON], ids=["merge-patch+json", "json"])
async def test_patch_merges(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    before = await create(
        client,
        "p",
        title="old",
        user_id="u1",
        settings={"model": "m1", "mode": "chat", "options": {"t": 1}},
        metadata={"keep": 1, "drop": 2, "deep": {"a": 1}},
    )
    patch = {
        "title": "new",
        "settings": {"model": "m2", "options": {"k": 2}},
        "metadata": {"drop": None, "deep": {"b": 2}},
    }
    response = await client.patch("/v1/sessions/p", content=json.dumps(patch), headers=headers)

    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"2"'
    body = response.json()
    assert body["title"] == "new"
    assert body["user_id"] == "u1"
    assert body["settings"] == {"model": "m2", "mode": "chat", "options": {"t": 1, "k": 2}}
    assert body["metadata"] == {"keep": 1, "deep": {"a": 1, "b": 2}}
    assert body["version"] == 2
    assert parse_time(body["updated_at"]) > parse_time(before["updated_at"])
    assert body["created_at"] == before["created_at"]
    assert await fetch(client, "p") == body


async def test_patch_nulls_remove_and_reset(client: httpx.AsyncClient) -> None:
    await create(client, "p", title="t", user_id="u", document_id="d", section_id="s", metadata={"a": 1})
    patch = {
        "title": None,
        "user_id": None,
        "document_id": None,
        "section_id": None,
        "metadata": None,
        "settings": None,
    }
    response = await client.patch("/v1/sessions/p", content=json.dumps(patch), headers=MERGE_PATCH)
    assert response.status_code == 200
    body = response.json()
    assert [body[k] for k in ("title", "user_id", "document_id", "section_id")] == [None] * 4
    assert body["metadata"] == {}
    assert body["settings"] == {}


async def test_settings_keys_nobody_set_are_absent_and_null_removes_them(client: httpx.AsyncClient) -> None:
    created = await create(client, "p", settings={"model": "m", "mode": None, "temperature": 0.2, "gone": None})
    assert created["settings"] == {"model": "m", "temperature": 0.2}
    assert (await create(client, "q"))["settings"] == {}
    patch = {"settings": {"model": None, "options": {"top_p": 1}, "temperature": None, "extra": "x"}}
    response = await client.patch("/v1/sessions/p", content=json.dumps(patch), headers=MERGE_PATCH)
    assert response.status_code == 200, response.text
    assert response.json()["settings"] == {"options": {"top_p": 1}, "extra": "x"}
    assert (await fetch(client, "p"))["settings"] == {"options": {"top_p": 1}, "extra": "x"}


async def test_a_stale_if_match_answers_412_with_the_current_etag(client: httpx.AsyncClient) -> None:
    await create(client, "p")
    await append(client, "p", "a")
    for method, path, body in (
        ("PATCH", "/v1/sessions/p", {"title": "x"}),
        ("POST", "/v1/sessions/p/messages", {"role": "user", "content": "x"}),
        ("DELETE", "/v1/sessions/p/messages", None),
    ):
        response = await client.request(method, path, json=body, headers={"If-Match": '"1"'})
        assert_problem(response, 412)
        assert response.headers["etag"] == '"2"', (method, path)


async def test_patch_if_match(client: httpx.AsyncClient) -> None:
    await create(client, "p")
    ok = await client.patch("/v1/sessions/p", json={"title": "a"}, headers={"If-Match": '"1"'})
    assert ok.status_code == 200
    assert ok.headers["etag"] == '"2"'
    ok = await client.patch("/v1/sessions/p", json={"title": "b"}, headers={"If-Match": '"9", "2"'})
    assert ok.status_code == 200
    ok = await client.patch("/v1/sessions/p", json={"title": "c"}, headers={"If-Match": "*"})
    assert ok.status_code == 200
    assert ok.json()["version"] == 4


async def test_patch_stale_if_match_is_412_and_changes_nothing(client: httpx.AsyncClient) -> None:
    await create(client, "p", title="v1")
    await client.patch("/v1/sessions/p", json={"title": "v2"})
    before = await snapshot(client, "p")

    failures = []
    for if_match in ('"1"', 'W/"2"', '"1", "3"', '"x"'):
        response = await client.patch("/v1/sessions/p", json={"title": "lost"}, headers={"If-Match": if_match})
        failures.append(problem_mismatch(if_match, response, 412))
    assert [f for f in failures if f] == []
    assert await snapshot(client, "p") == before


async def test_patch_missing_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.patch("/v1/sessions/missing", json={"title": "x"}), 404)
    assert_problem(await client.get("/v1/sessions/missing"), 404)


async def test_patch_server_owned_field_is_422_and_changes_nothing(client: httpx.AsyncClient) -> None:
    await create(client, "p", title="keep")
    await append(client, "p", "a")
    before = await snapshot(client, "p")

    failures = []
    for field in SERVER_OWNED:
        response = await client.patch("/v1/sessions/p", json={"title": "changed", **field}, headers=MERGE_PATCH)
        failures.append(problem_mismatch(str(field), response, 422))
    for body in ("[]", '"title"', "1", "null"):
        response = await client.patch("/v1/sessions/p", content=body, headers=MERGE_PATCH)
        failures.append(problem_mismatch(body, response, 422))
    assert [f for f in failures if f] == []
    assert await snapshot(client, "p") == before
    assert_problem(await client.get("/v1/sessions/other"), 404)


# --- DELETE /v1/sessions/{id} -------------------------------------------------------


async def test_delete(client: httpx.AsyncClient) -> None:
    await create(client, "d")
    await append(client, "d", "a", "b")

    response = await client.delete("/v1/sessions/d")
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(await client.get("/v1/sessions/d"), 404)
    assert_problem(await client.get("/v1/sessions/d/messages"), 404)
    assert_problem(await client.delete("/v1/sessions/d"), 404)
    assert (await client.get("/v1/sessions")).json()["items"] == []
    assert_problem(await client.delete("/v1/sessions/missing"), 404)


async def test_delete_if_match(client: httpx.AsyncClient) -> None:
    await create(client, "d")
    await append(client, "d", "a")
    before = await snapshot(client, "d")

    assert_problem(await client.delete("/v1/sessions/d", headers={"If-Match": '"1"'}), 412)
    assert await snapshot(client, "d") == before
    assert (await client.delete("/v1/sessions/d", headers={"If-Match": '"2"'})).status_code == 204
    assert_problem(await client.get("/v1/sessions/d"), 404)


async def test_recreate_after_delete_starts_fresh(client: httpx.AsyncClient) -> None:
    await create(client, "d")
    await append(client, "d", "old")
    await client.delete("/v1/sessions/d")

    response = await client.put("/v1/sessions/d")
    assert response.status_code == 201
    assert (response.json()["version"], response.json()["last_seq"]) == (1, 0)
    assert (await client.get("/v1/sessions/d/messages")).json() == {"items": [], "has_more": False}


# --- probes ---------------------------------------------------------------------------


async def test_probes(client: httpx.AsyncClient) -> None:
    for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
        response = await client.get(path)
        assert response.status_code == 200, response.text
        assert response.json() == {"status": status}
