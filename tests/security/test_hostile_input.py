"""Hostile input: traversal ids, non-JSON JSON, server-owned fields, and every limit of the README.

Each case checks the answer (4xx, never a 5xx) and that nothing changed: no
session appeared, none moved, and no file was written outside the data dir.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_asyncio

from chatsessions.config import Settings
from tests.security.support import (
    JSON,
    PROBLEM_JSON,
    STORES,
    RunningApp,
    asgi_request,
    files_under,
    make_tenants,
    running_app,
    store_settings,
)

pytestmark = pytest.mark.asyncio

MESSAGE = {"role": "user", "content": "hello"}


@dataclass(frozen=True, slots=True)
class Target:
    app: RunningApp
    auth: dict[str, str]
    settings: Settings
    root: Path  # everything the test may touch on disk lives below


@pytest_asyncio.fixture(params=STORES)
async def target(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Target]:
    tenants = make_tenants(tmp_path / "keys")
    settings = store_settings(request.param, tmp_path, keys_file=tenants.keys_file)
    async with running_app(settings) as app:
        response = await app.client.put("/v1/sessions/s1", json={"title": "t"}, headers=tenants.alice)
        assert response.status_code == 201
        response = await app.client.post("/v1/sessions/s1/messages", json=MESSAGE, headers=tenants.alice)
        assert response.status_code == 201
        yield Target(app, tenants.alice, settings, tmp_path)


async def snapshot(target: Target) -> list[Any]:
    client, auth = target.app.client, target.auth
    listing = (await client.get("/v1/sessions?limit=100", headers=auth)).json()
    messages = (await client.get("/v1/sessions/s1/messages?limit=1000", headers=auth)).json()
    return [listing, messages]


def assert_client_error(status: int, body: bytes, headers: dict[str, str], context: object) -> None:
    assert 400 <= status < 500, (context, status, body[:300])
    assert headers.get("content-type") == PROBLEM_JSON, context


# --- traversal and look-alike ids -------------------------------------------------

TRAVERSAL_PATHS = [
    "/v1/sessions/..",
    "/v1/sessions/.",
    "/v1/sessions/%2e%2e",
    "/v1/sessions/%2E%2E",
    "/v1/sessions/..%2f..%2fetc%2fpasswd",
    "/v1/sessions/../../../etc/passwd",
    "/v1/sessions/a%2Fb",
    "/v1/sessions/a/b",
    "/v1/sessions/a%5Cb",
    "/v1/sessions/%00",
    "/v1/sessions/s1%00",
    "/v1/sessions/s1%0A",
    "/v1/sessions/s1%20",
    "/v1/sessions/" + "a" * 300,
    "/v1/sessions/" + "a" * 129,
    "/v1/sessions/s\u0131",  # dotless i
    "/v1/sessions/\u0455\u0435\u0455\u0455\u0456\u043e\u043f",  # Cyrillic look-alike of "session"
    "/v1/sessions/\uff53\uff11",  # fullwidth "s1"
    "/v1/sessions/s\u200b1",  # zero-width space
    "/v1/sessions/\u212a",  # Kelvin sign, folds to "k"
    "/v1/sessions/\u017f1",  # long s, folds to "s"
    "/v1/sessions/%ff",
]
SUFFIXES = ["", "/messages", "/messages/1"]


async def test_traversal_ids_in_the_path_are_404_or_422(target: Target) -> None:
    before = await snapshot(target)
    outside = files_under(target.root) - files_under(target.settings.data_dir)
    for raw in TRAVERSAL_PATHS:
        for suffix in SUFFIXES:
            # As a client sends it: non-ASCII characters percent-encoded as UTF-8, the rest as written.
            path = quote(raw + suffix, safe="/%").encode("ascii")
            for method in ("GET", "PUT", "PATCH", "DELETE", "POST"):
                response = await asgi_request(target.app, method, path, target.auth)
                context = (method, path)
                assert response.status in (404, 405, 422), (context, response.status, response.body[:200])
                assert response.headers.get("content-type") == PROBLEM_JSON, context
    assert await snapshot(target) == before
    assert files_under(target.root) - files_under(target.settings.data_dir) == outside


BAD_IDS = [
    "..",
    ".",
    "../x",
    "a/b",
    "a\\b",
    "\x00",
    "s1\x00",
    "s1\n",
    "a" * 129,
    "a" * 300,
    "",
    "\u0455\u0435\u0455\u0455\u0456\u043e\u043f",
    "\uff53\uff11",
    "s\u200b1",
    "\u212a",
    "con.txt",
    "s 1",
]


async def test_traversal_ids_in_bodies_are_422(target: Target) -> None:
    client, auth = target.app.client, target.auth
    before = await snapshot(target)
    for bad in BAD_IDS:
        response = await client.post("/v1/sessions", json={"id": bad}, headers=auth)
        assert response.status_code == 422, (bad, response.text)
        response = await client.put("/v1/sessions/s2", json={"id": bad}, headers=auth)
        assert response.status_code == 422, (bad, response.text)
    assert await snapshot(target) == before


RESERVED = ["CON", "con", "NUL", "nul", "PRN", "AUX", "COM1", "LPT1", "Con", "-", "_", "--", "a" * 128]


async def test_device_names_and_case_variants_are_plain_distinct_ids(target: Target) -> None:
    """Valid ids that are special on some file systems: each is its own session, all kept in the data dir."""
    client, auth = target.app.client, target.auth
    outside = files_under(target.root) - files_under(target.settings.data_dir)
    for session_id in RESERVED:
        response = await client.put(f"/v1/sessions/{session_id}", headers=auth)
        assert response.status_code == 201, (session_id, response.text)
        message = {"role": "user", "content": session_id}
        response = await client.post(f"/v1/sessions/{session_id}/messages", json=message, headers=auth)
        assert response.status_code == 201, session_id
    for session_id in RESERVED:
        page = (await client.get(f"/v1/sessions/{session_id}/messages", headers=auth)).json()
        assert [m["content"] for m in page["items"]] == [session_id], "CON and con must not share a file"
    assert files_under(target.root) - files_under(target.settings.data_dir) == outside
    names = {p.name for p in files_under(target.settings.data_dir)}
    assert not names & set(RESERVED), "file names are never built from raw ids"


# --- JSON that is not RFC 8259 JSON -----------------------------------------------

NOT_JSON = [
    b'{"role": "user", "content": "x", "metadata": {"n": NaN}}',
    b'{"role": "user", "content": "x", "metadata": {"n": Infinity}}',
    b'{"role": "user", "content": "x", "metadata": {"n": -Infinity}}',
    b'{"role": "user", "content": "x", "metadata": {"n": 1e999}}',
    b'{"role": "user", "content": "x", "metadata": {"n": -1e400}}',
    b'{"role": "user", "content": "x", "references": [{"page": NaN}]}',
    b'{"role": "user", "content": "x", "metadata": {"n": 1' + b"0" * 5000 + b"}}",
    b'{"role": "user", "role": "system", "content": "x"}',
    b'{"role": "user", "content": "x", "content": "y"}',
    b'{"role": "user", "content": "x", "metadata": {"a": 1, "a": 2}}',
    b'{"role": "user", "content": "x", "references": [{"doc": 1, "doc": 1}]}',
    b'{"role": "user", "content": "\xff"}',
    b'{"role": "user", "content": "\xc0\xaf"}',
    b'{"role": "user", "content": "\xed\xa0\x80"}',
    b'{"role": "user", "content": "a\\ud800b"}',
    b'{"role": "user", "content": "a\\udc00"}',
    b'{"role": "user", "content": "x", "metadata": {"\\ud800": 1}}',
    b'\xef\xbb\xbf{"role": "user", "content": "x"}',
    b'{"role": "user", "content": "x"} {}',
    b'{"role": "user", "content": "x",}',
    b"{'role': 'user', 'content': 'x'}",
    b'{"role": "user", "content": "x"',
    b"",
    b"null",
    b"[]",
    b'"x"',
]


async def test_json_that_is_not_json_is_rejected_on_append(target: Target) -> None:
    client, auth = target.app.client, target.auth
    before = await snapshot(target)
    for body in NOT_JSON:
        for path in ("/v1/sessions/s1/messages", "/v1/sessions/s1/messages/batch"):
            sent = body if path.endswith("messages") else b'{"messages": [' + body + b"]}"
            response = await client.post(path, content=sent, headers={**auth, **JSON})
            assert_client_error(response.status_code, response.content, dict(response.headers), (path, body[:60]))
    assert await snapshot(target) == before


async def test_json_that_is_not_json_is_rejected_on_create_and_patch(target: Target) -> None:
    client, auth = target.app.client, target.auth
    before = await snapshot(target)
    bodies = [
        b'{"metadata": {"n": NaN}}',
        b'{"metadata": {"n": 1e999}}',
        b'{"title": "a", "title": "b"}',
        b'{"id": "x1", "id": "x2"}',
        b'{"settings": {"model": "a", "model": "b"}}',
        b'{"title": "\xff"}',
        b'{"title": "\\udfff"}',
    ]
    for body in bodies:
        for method, path in (("POST", "/v1/sessions"), ("PUT", "/v1/sessions/x1"), ("PATCH", "/v1/sessions/s1")):
            if method == "PATCH" and b'"id"' in body:
                continue
            response = await client.request(method, path, content=body, headers={**auth, **JSON})
            assert_client_error(response.status_code, response.content, dict(response.headers), (method, body))
    assert await snapshot(target) == before


# --- server-owned fields ----------------------------------------------------------

SERVER_OWNED_SESSION = {
    "seq": 5,
    "version": 99,
    "created_at": "2000-01-01T00:00:00Z",
    "updated_at": "2000-01-01T00:00:00Z",
    "tenant": "bob",
    "tenant_id": "bob",
    "message_count": 50,
    "last_seq": 50,
}
SERVER_OWNED_MESSAGE = {
    "seq": 99,
    "created_at": "2000-01-01T00:00:00Z",
    "tenant": "bob",
    "version": 7,
    "session_id": "other",
    "updated_at": "2000-01-01T00:00:00Z",  # `id` is the client's message id (DESIGN.md), not server-owned
}


async def test_server_owned_fields_are_never_obeyed(target: Target) -> None:
    client, auth = target.app.client, target.auth
    before = await snapshot(target)
    for field, value in SERVER_OWNED_SESSION.items():
        for method, path in (("POST", "/v1/sessions"), ("PUT", "/v1/sessions/x1"), ("PATCH", "/v1/sessions/s1")):
            response = await client.request(method, path, json={"title": "t", field: value}, headers=auth)
            assert response.status_code == 422, (method, field, response.text)
    for field, value in SERVER_OWNED_MESSAGE.items():
        response = await client.post("/v1/sessions/s1/messages", json={**MESSAGE, field: value}, headers=auth)
        assert response.status_code == 422, (field, response.text)
        batch = {"messages": [MESSAGE, {**MESSAGE, field: value}]}
        response = await client.post("/v1/sessions/s1/messages/batch", json=batch, headers=auth)
        assert response.status_code == 422, (field, response.text)
    response = await client.patch("/v1/sessions/s1", json={"id": "s2"}, headers=auth)
    assert response.status_code == 422
    assert await snapshot(target) == before


async def test_tenant_in_query_headers_or_settings_is_not_obeyed(target: Target) -> None:
    client, auth = target.app.client, target.auth
    spoof = {**auth, "X-Tenant": "bob", "Tenant": "bob", "Forwarded": "for=bob"}
    response = await client.post(
        "/v1/sessions?tenant=bob", json={"id": "q1", "settings": {"tenant": "bob"}}, headers=spoof
    )
    assert response.status_code == 201
    assert response.json()["settings"]["tenant"] == "bob"  # a free settings key, kept as data
    assert (await client.get("/v1/sessions/q1", headers=auth)).status_code == 200


# --- limits -----------------------------------------------------------------------


async def test_id_and_key_lengths(target: Target) -> None:
    client, auth = target.app.client, target.auth
    assert (await client.put("/v1/sessions/" + "i" * 128, headers=auth)).status_code == 201
    assert (await client.put("/v1/sessions/" + "i" * 129, headers=auth)).status_code == 422
    assert (await client.post("/v1/sessions", json={"id": "j" * 129}, headers=auth)).status_code == 422
    path = "/v1/sessions/s1/messages"
    ok = await client.post(path, json=MESSAGE, headers={**auth, "Idempotency-Key": "k" * 255})
    assert ok.status_code == 201
    for key in ("k" * 256, "k" * 5000, ""):
        response = await client.post(path, json=MESSAGE, headers={**auth, "Idempotency-Key": key})
        assert response.status_code == 422, len(key)


async def test_list_limits(target: Target) -> None:
    client, auth = target.app.client, target.auth
    for query in ("limit=0", "limit=101", "limit=-1", "limit=abc", "limit=1e3", "limit=99999999999999999999999"):
        response = await client.get(f"/v1/sessions?{query}", headers=auth)
        assert response.status_code == 422, query
    assert (await client.get("/v1/sessions?limit=100", headers=auth)).status_code == 200
    for query in ("limit=0", "limit=1001", "after=-1", f"before={2**62 + 1}", "order=sideways", "limit=2.5"):
        response = await client.get(f"/v1/sessions/s1/messages?{query}", headers=auth)
        assert response.status_code == 422, query
    assert (await client.get("/v1/sessions/s1/messages?limit=1000", headers=auth)).status_code == 200
    for query in (f"user_id={'u' * 1025}", f"cursor={'c' * 2049}", "cursor=bm90IGEgY3Vyc29y", "cursor=%%%"):
        response = await client.get(f"/v1/sessions?{query}", headers=auth)
        assert response.status_code == 422, query[:30]
    for seq in ("0", "-1", str(2**62 + 1), "x", "1.5"):
        response = await client.get(f"/v1/sessions/s1/messages/{seq}", headers=auth)
        assert response.status_code == 422, seq


def nested(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_content_metadata_and_batch_limits(target: Target) -> None:
    client, auth, settings = target.app.client, target.auth, target.settings
    path = "/v1/sessions/s1/messages"
    before = await snapshot(target)
    too_big = [
        {**MESSAGE, "content": "x" * (settings.max_content_bytes + 1)},
        {**MESSAGE, "content": "\u00e9" * (settings.max_content_bytes // 2 + 1)},  # 2 bytes each in UTF-8
        {**MESSAGE, "metadata": {"k": "v" * settings.max_json_bytes}},
        {**MESSAGE, "references": [{"k": "v" * settings.max_json_bytes}]},
        {**MESSAGE, "metadata": nested(settings.max_json_depth + 1)},
        {**MESSAGE, "references": [nested(settings.max_json_depth)]},
        {**MESSAGE, "metadata": {f"k{i}": 0 for i in range(settings.max_json_keys + 1)}},
        {**MESSAGE, "references": [{"a": [{f"k{i}": 0 for i in range(settings.max_json_keys + 1)}]}]},
    ]
    for message in too_big:
        response = await client.post(path, json=message, headers=auth)
        assert response.status_code == 422, response.text[:200]
        response = await client.post(f"{path}/batch", json={"messages": [MESSAGE, message]}, headers=auth)
        assert response.status_code == 422, response.text[:200]
    for count in (0, 101):
        response = await client.post(f"{path}/batch", json={"messages": [MESSAGE] * count}, headers=auth)
        assert response.status_code == 422, count
    for field in ("metadata", "settings"):
        for value in (nested(settings.max_json_depth + 1), {f"k{i}": 0 for i in range(settings.max_json_keys + 1)}):
            for method, url in (("POST", "/v1/sessions"), ("PATCH", "/v1/sessions/s1")):
                response = await client.request(method, url, json={field: value}, headers=auth)
                assert response.status_code == 422, (method, field)
    assert await snapshot(target) == before
    at_limit = {
        **MESSAGE,
        "metadata": {f"k{i}": 0 for i in range(settings.max_json_keys)},
        "references": [nested(settings.max_json_depth - 1)],
    }
    assert (await client.post(path, json=at_limit, headers=auth)).status_code == 201


@pytest.mark.parametrize("depth", [33, 500, 1_000, 5_000, 100_000])
async def test_deep_json_is_rejected_quickly(tmp_path: Path, depth: int) -> None:
    """Deep nesting anywhere in a body: 4xx, never a 500 or a RecursionError."""
    settings = Settings(store="memory", data_dir=tmp_path / "data")
    async with running_app(settings) as app:
        client = app.client
        assert (await client.put("/v1/sessions/s1")).status_code == 201
        array = b"[" * depth + b"]" * depth
        obj = b'{"a":' * depth + b"{}" + b"}" * depth
        bodies = [
            ("POST", "/v1/sessions/s1/messages", array),
            ("POST", "/v1/sessions/s1/messages", b'{"role":"user","content":"x","metadata":{"a":' + array + b"}}"),
            ("POST", "/v1/sessions/s1/messages", b'{"role":"user","content":"x","references":' + array + b"}"),
            ("POST", "/v1/sessions/s1/messages/batch", b'{"messages":' + array + b"}"),
            ("POST", "/v1/sessions", b'{"metadata":' + obj + b"}"),
            ("PUT", "/v1/sessions/s2", b'{"settings":{"options":' + obj + b"}}"),
            ("PATCH", "/v1/sessions/s1", b'{"metadata":' + obj + b"}"),
        ]
        for method, path, body in bodies:
            response = await client.request(method, path, content=body, headers=JSON)
            assert response.status_code in (400, 413, 422), (method, path, depth, response.text[:200])
        page = (await client.get("/v1/sessions")).json()
        assert [s["id"] for s in page["items"]] == ["s1"]
        assert page["items"][0]["version"] == 1


async def test_huge_bodies_are_413(tmp_path: Path) -> None:
    settings = Settings(store="memory", data_dir=tmp_path / "data")
    limit = settings.max_body_bytes
    async with running_app(settings) as app:
        client = app.client
        assert (await client.put("/v1/sessions/s1")).status_code == 201
        padding = b" " * (limit + 1 - len(b'{"role":"user","content":"x"}'))
        just_over = b'{"role":"user","content":"x"}' + padding
        assert len(just_over) == limit + 1
        response = await client.post("/v1/sessions/s1/messages", content=just_over, headers=JSON)
        assert response.status_code == 413
        assert response.headers["content-type"] == PROBLEM_JSON

        # Without Content-Length (chunks as they come): counted while streaming.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"role":"user","content":"'
            for _ in range(limit // 65536 + 1):
                yield b"x" * 65536
            yield b'"}'

        response = await client.post("/v1/sessions/s1/messages", content=chunks(), headers=JSON)
        assert response.status_code == 413
        # A body right at the limit is fine.
        at_limit = b'{"role":"user","content":"x"}' + b" " * (limit - len(b'{"role":"user","content":"x"}'))
        assert (await client.post("/v1/sessions/s1/messages", content=at_limit, headers=JSON)).status_code == 201
        session = (await client.get("/v1/sessions/s1")).json()
        assert session["message_count"] == 1


async def test_wrong_methods_get_405_listing_every_method_of_the_resource(target: Target) -> None:
    client, auth = target.app.client, target.auth
    cases = {
        ("OPTIONS", "/v1/sessions"): "DELETE, GET, POST",
        ("PATCH", "/v1/sessions"): "DELETE, GET, POST",
        ("POST", "/v1/sessions/s1"): "DELETE, GET, PATCH, PUT",
        ("GET", "/v1/sessions/s1/messages/batch"): "POST",
        ("DELETE", "/v1/sessions/s1/messages/batch"): "POST",
        ("OPTIONS", "/v1/sessions/s1/messages/batch"): "POST",
        ("PUT", "/v1/sessions/s1/messages/1"): "DELETE, GET",
    }
    for (method, path), allow in cases.items():
        response = await client.request(method, path, headers=auth)
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allow, (method, path)
        assert response.headers["content-type"] == PROBLEM_JSON
