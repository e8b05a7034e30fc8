"""The append routes (`api.appends`): `LeanRoute`s whose handlers are plain ASGI.

Behaviour of the appends themselves is tested in test_messages.py and test_errors.py, which go
through the lean routes like every client. Here: that the lean handlers answer bad input exactly
as FastAPI answers it when it serves the same endpoints on plain routes, and what the lean
handlers do themselves (500s, root paths, other methods on their paths, headers).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from chatsessions.api.appends import append_routes
from chatsessions.api.creates import create_routes
from chatsessions.api.problems import install_problem_handlers
from chatsessions.api.routing import JSONRoute
from chatsessions.config import Settings
from tests.api.support import JSON, RunningApp, assert_problem, create, running_app, snapshot

pytestmark = pytest.mark.asyncio

GOOD = {"role": "user", "content": "hi"}

# (label, path, headers, body): each is refused before it reaches the store.
BAD_REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("missing body", "/v1/sessions/s/messages", JSON, b""),
    ("no content type", "/v1/sessions/s/messages", {}, json.dumps(GOOD).encode()),
    ("form body", "/v1/sessions/s/messages", {"content-type": "text/plain"}, b"role=user"),
    ("malformed JSON", "/v1/sessions/s/messages", JSON, b'{"role": "user",'),
    ("not an object", "/v1/sessions/s/messages", JSON, b"[1, 2]"),
    ("null body", "/v1/sessions/s/messages", JSON, b"null"),
    ("null batch", "/v1/sessions/s/messages/batch", JSON, b"null"),
    ("NaN", "/v1/sessions/s/messages", JSON, b'{"role":"user","content":"x","metadata":{"a":NaN}}'),
    ("duplicate key", "/v1/sessions/s/messages", JSON, b'{"role":"user","role":"tool","content":"x"}'),
    ("bad role", "/v1/sessions/s/messages", JSON, json.dumps({"role": "god", "content": "x"}).encode()),
    ("no content", "/v1/sessions/s/messages", JSON, json.dumps({"role": "user"}).encode()),
    ("extra field", "/v1/sessions/s/messages", JSON, json.dumps({**GOOD, "seq": 5}).encode()),
    ("metadata list", "/v1/sessions/s/messages", JSON, json.dumps({**GOOD, "metadata": [1]}).encode()),
    ("bad id", "/v1/sessions/a.b/messages", JSON, json.dumps(GOOD).encode()),
    ("newline id", "/v1/sessions/a%0A/messages", JSON, json.dumps(GOOD).encode()),
    ("bad id and body", "/v1/sessions/a.b/messages", JSON, json.dumps({"role": 1}).encode()),
    ("empty key", "/v1/sessions/s/messages", {**JSON, "idempotency-key": ""}, json.dumps(GOOD).encode()),
    (
        "long if-match",
        "/v1/sessions/s/messages",
        {**JSON, "if-match": '"' + "1" * 9000 + '"'},
        json.dumps(GOOD).encode(),
    ),
    (
        "bad if-match and key",
        "/v1/sessions/a.b/messages/batch",
        {**JSON, "if-match": "x" * 8193, "idempotency-key": ""},
        json.dumps({"messages": [{}]}).encode(),
    ),
    ("long key", "/v1/sessions/s/messages", {**JSON, "idempotency-key": "k" * 256}, json.dumps(GOOD).encode()),
    ("empty batch", "/v1/sessions/s/messages/batch", JSON, json.dumps({"messages": []}).encode()),
    ("bad batch item", "/v1/sessions/s/messages/batch", JSON, json.dumps({"messages": [GOOD, {}]}).encode()),
    ("batch of 101", "/v1/sessions/s/messages/batch", JSON, json.dumps({"messages": [GOOD] * 101}).encode()),
    ("batch not a list", "/v1/sessions/s/messages/batch", JSON, json.dumps({"messages": GOOD}).encode()),
    # The lean create (`api.creates`).
    ("create: form body", "/v1/sessions", {"content-type": "text/plain"}, b"id=x"),
    ("create: body without a type", "/v1/sessions", {}, b'{"id": "x"}'),
    ("create: malformed JSON", "/v1/sessions", JSON, b'{"id": '),
    ("create: not an object", "/v1/sessions", JSON, b"[1]"),
    ("create: a string", "/v1/sessions", JSON, b'"x"'),
    ("create: bad id", "/v1/sessions", JSON, json.dumps({"id": "a.b"}).encode()),
    ("create: server-owned field", "/v1/sessions", JSON, json.dumps({"version": 3}).encode()),
    ("create: bad settings", "/v1/sessions", JSON, json.dumps({"settings": {"model": 5}}).encode()),
    ("create: NaN", "/v1/sessions", JSON, b'{"metadata": {"a": NaN}}'),
    ("create: empty key", "/v1/sessions", {**JSON, "idempotency-key": ""}, b"{}"),
    ("create: bad key and body", "/v1/sessions", {**JSON, "idempotency-key": "k" * 300}, b'{"title": 1}'),
]


@pytest_asyncio.fixture
async def app(settings: Settings) -> AsyncIterator[RunningApp]:
    async with running_app(settings) as running:
        yield running


def _essence(response: httpx.Response) -> tuple[int, str, list[tuple[Any, ...]]]:
    body = response.json()
    issues = [(tuple(i["loc"]), i["type"], i["msg"]) for i in body.get("errors") or []]
    return response.status_code, body["type"], issues


@pytest_asyncio.fixture
async def reference() -> AsyncIterator[httpx.AsyncClient]:
    """FastAPI itself serving the same endpoints on plain routes, with the service's problem handlers."""
    app = FastAPI()
    install_problem_handlers(app)
    for lean in [*append_routes(), *create_routes()]:
        app.router.routes.append(
            JSONRoute(
                lean.path,
                lean.endpoint,
                methods=lean.methods,
                status_code=lean.status_code,
                response_model=lean.response_model,
            )
        )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        yield client


async def test_lean_routes_refuse_bad_input_as_fastapi_would(settings: Settings, reference: httpx.AsyncClient) -> None:
    failures: list[str] = []
    async with running_app(settings) as app:
        await create(app.client, "s")
        before = await snapshot(app.client, "s")
        for label, path, headers, body in BAD_REQUESTS:
            served = await app.client.post(path, content=body, headers=headers)
            expected = await reference.post(path, content=body, headers=headers)
            assert expected.status_code in (400, 415, 422), (label, expected.text)
            if _essence(served) != _essence(expected):
                failures.append(f"{label}: lean {_essence(served)} != FastAPI {_essence(expected)}")
        assert await snapshot(app.client, "s") == before
        listing = await app.client.get("/v1/sessions")
        assert [session["id"] for session in listing.json()["items"]] == ["s"]  # no create got through
    assert not failures, "\n".join(failures)


async def test_a_bug_during_an_append_is_a_logged_500_problem(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(settings) as app:
        await create(app.client, "s")

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug in the store")

        monkeypatch.setattr(type(app.repository), "append_messages", broken)
        transport = httpx.ASGITransport(app.asgi, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/v1/sessions/s/messages", json=GOOD)
    body = assert_problem(response, 500)
    assert "a bug in the store" not in body["detail"]  # internals stay in the log
    assert any("a bug in the store" in repr(record.exc_info) for record in caplog.records)


async def test_the_appends_serve_under_a_root_path(settings: Settings) -> None:
    async with running_app(settings) as app:
        await create(app.client, "s")
        transport = httpx.ASGITransport(app.asgi, root_path="/chat")
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/chat/v1/sessions/s/messages", json=GOOD)
            assert response.status_code == 201, response.text
            assert response.json()["seq"] == 1
            page = await client.get("/chat/v1/sessions/s/messages")
            assert [m["content"] for m in page.json()["items"]] == ["hi"]


async def test_other_methods_on_the_append_paths_reach_the_routes(app: RunningApp) -> None:
    await create(app.client, "s")
    assert (await app.client.post("/v1/sessions/s/messages", json=GOOD)).status_code == 201
    assert (await app.client.get("/v1/sessions/s/messages")).json()["items"][0]["content"] == "hi"
    refused = await app.client.put("/v1/sessions/s/messages", json=GOOD)
    assert_problem(refused, 405)
    assert refused.headers["allow"] == "DELETE, GET, POST"
    for method in ("GET", "PUT"):  # not GET .../{seq} with seq "batch"
        refused = await app.client.request(method, "/v1/sessions/s/messages/batch", json=GOOD)
        assert_problem(refused, 405)
        assert refused.headers["allow"] == "POST"
    assert (await app.client.delete("/v1/sessions/s/messages")).status_code == 204


async def test_append_answers_carry_their_headers(app: RunningApp) -> None:
    await create(app.client, "s")
    one = await app.client.post("/v1/sessions/s/messages", json=GOOD, headers={"Idempotency-Key": "k1"})
    assert one.status_code == 201
    assert one.headers["location"] == "/v1/sessions/s/messages/1"
    assert one.headers["etag"] == '"2"'
    assert one.headers["content-type"] == "application/json"
    assert int(one.headers["content-length"]) == len(one.content)
    replay = await app.client.post("/v1/sessions/s/messages", json=GOOD, headers={"Idempotency-Key": "k1"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert (replay.status_code, replay.content, replay.headers["location"]) == (
        201,
        one.content,
        one.headers["location"],
    )
    batch = await app.client.post("/v1/sessions/s/messages/batch", json={"messages": [GOOD, GOOD]})
    assert batch.status_code == 201
    assert batch.headers["etag"] == '"3"'
    assert "location" not in batch.headers
    assert [m["seq"] for m in batch.json()["items"]] == [2, 3]
