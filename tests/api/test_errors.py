"""Bad input over HTTP: every error is problem+json with the documented status, and changes nothing.

Most tests here are tables: each sends many bad requests to one app (building an app per case
would make the suite slow) and reports every case that did not answer as documented. The `state`
fixture proves afterwards that none of them changed anything.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio

from chatsessions.config import Settings
from tests.api.support import (
    JSON,
    MERGE_PATCH,
    assert_problem,
    create,
    nested,
    problem_mismatch,
    running_app,
    snapshot,
)

pytestmark = pytest.mark.asyncio

MESSAGES = "/v1/sessions/s/messages"
BATCH = "/v1/sessions/s/messages/batch"

# Every route that takes a JSON body, with a valid body for it.
BODY_ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/sessions", {"title": "t"}),
    ("PUT", "/v1/sessions/new", {"title": "t"}),
    ("PATCH", "/v1/sessions/s", {"title": "t"}),
    ("POST", MESSAGES, {"role": "user", "content": "x"}),
    ("POST", BATCH, {"messages": [{"role": "user", "content": "x"}]}),
]
BODY_ROUTE_IDS = ["create", "put", "patch", "append", "batch"]

# Every route with a session id in its path; `{id}` is filled in.
ID_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/sessions/{id}", None),
    ("PUT", "/v1/sessions/{id}", {}),
    ("PATCH", "/v1/sessions/{id}", {"title": "t"}),
    ("DELETE", "/v1/sessions/{id}", None),
    ("POST", "/v1/sessions/{id}/messages", {"role": "user", "content": "x"}),
    ("POST", "/v1/sessions/{id}/messages/batch", {"messages": [{"role": "user", "content": "x"}]}),
    ("GET", "/v1/sessions/{id}/messages", None),
    ("GET", "/v1/sessions/{id}/messages/1", None),
    ("DELETE", "/v1/sessions/{id}/messages", None),
]
ID_ROUTE_IDS = ["get", "put", "patch", "delete", "append", "batch", "page", "message", "clear"]

MALFORMED: dict[str, bytes] = {
    "truncated": b'{"title": ',
    "single-quotes": b"{'title': 'x'}",
    "trailing-comma": b'{"title": "x",}',
    "text": b"not json",
    "trailing-data": b'{"a": 1} trailing',
    "NaN": b'{"a": NaN}',
    "Infinity": b'{"a": Infinity}',
    "-Infinity": b'{"a": -Infinity}',
    "overflow-to-infinity": b'{"a": 1e999}',
    "duplicate-key": b'{"a": 1, "a": 2}',
    "nested-duplicate-key": b'{"a": {"b": 1, "b": 1}}',
    "invalid-utf8": b'{"a": "\xff\xfe"}',
    "invalid-utf8-sequence": b'{"a": "\xc3\x28"}',
    "utf8-encoded-surrogate": b'{"a": "\xed\xa0\x80"}',
    "utf16": '{"a": 1}'.encode("utf-16"),
}


@pytest_asyncio.fixture
async def state(client: httpx.AsyncClient) -> AsyncIterator[None]:
    """Session `s` with two messages; afterwards, proves that nothing changed."""
    await create(client, "s", title="kept", metadata={"a": 1})
    response = await client.post(BATCH, json={"messages": [{"role": "user", "content": c} for c in ("one", "two")]})
    assert response.status_code == 201
    before = await snapshot(client, "s")
    listing = (await client.get("/v1/sessions")).json()
    yield
    assert await snapshot(client, "s") == before
    assert (await client.get("/v1/sessions")).json() == listing


async def send(
    client: httpx.AsyncClient, method: str, path: str, body: bytes, content_type: str | None = "application/json"
) -> httpx.Response:
    headers = {"content-type": content_type} if content_type else {}
    return await client.request(method, path, content=body, headers=headers)


# --- 400: not JSON ----------------------------------------------------------------------


@pytest.mark.usefixtures("state")
@pytest.mark.parametrize(("method", "path", "valid"), BODY_ROUTES, ids=BODY_ROUTE_IDS)
async def test_malformed_json_is_400(client: httpx.AsyncClient, method: str, path: str, valid: dict[str, Any]) -> None:
    failures = [problem_mismatch(name, await send(client, method, path, body), 400) for name, body in MALFORMED.items()]
    assert [f for f in failures if f] == []


@pytest.mark.usefixtures("state")
async def test_non_finite_numbers_and_duplicates_deep_in_a_message_are_400(client: httpx.AsyncClient) -> None:
    bodies = {
        f"metadata-{literal.decode()}": b'{"role": "user", "content": "x", "metadata": {"score": ' + literal + b"}}"
        for literal in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400")
    }
    bodies["duplicate-role"] = b'{"role": "user", "content": "x", "role": "system"}'
    bodies["duplicate-in-references"] = b'{"role": "user", "content": "x", "references": [{"p": 1, "p": 2}]}'
    failures = [
        problem_mismatch(name, await send(client, "POST", MESSAGES, body), 400) for name, body in bodies.items()
    ]
    assert [f for f in failures if f] == []


@pytest.mark.usefixtures("state")
async def test_lone_surrogate_escape_is_rejected_cleanly(client: httpx.AsyncClient) -> None:
    # Valid JSON syntax, but "\ud800" is no Unicode scalar value: it cannot be stored or sent back as UTF-8.
    failures = []
    for method, path, valid in BODY_ROUTES:
        raw = json.dumps(valid).replace('"t"', '"\\ud800"').replace('"x"', '"x\\udfff"')
        response = await send(client, method, path, raw.encode())
        failures.append(problem_mismatch(path, response, 422 if response.status_code == 422 else 400))
    response = await send(client, "POST", MESSAGES, b'{"role": "user", "content": "x", "metadata": {"\\ud800": 1}}')
    failures.append(problem_mismatch("surrogate key", response, 422 if response.status_code == 422 else 400))
    assert [f for f in failures if f] == []


@pytest.mark.usefixtures("state")
async def test_absurdly_nested_body_is_rejected(client: httpx.AsyncClient) -> None:
    failures = []
    for depth in (100, 100_000):
        body = b'{"role": "user", "content": "x", "metadata": {"a": ' + b"[" * depth + b"]" * depth + b"}}"
        response = await send(client, "POST", MESSAGES, body)
        failures.append(problem_mismatch(f"depth {depth}", response, 400 if response.status_code == 400 else 422))
    assert [f for f in failures if f] == []


# --- 415: not JSON at all -------------------------------------------------------------------


@pytest.mark.usefixtures("state")
@pytest.mark.parametrize(("method", "path", "valid"), BODY_ROUTES, ids=BODY_ROUTE_IDS)
async def test_wrong_content_type_is_415(
    client: httpx.AsyncClient, method: str, path: str, valid: dict[str, Any]
) -> None:
    body = json.dumps(valid).encode()
    failures = [
        problem_mismatch(str(content_type), await send(client, method, path, body, content_type), 415)
        for content_type in (
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/xml",
            "application/jsonx",
            None,
        )
    ]
    assert [f for f in failures if f] == []


async def test_edge_inputs_that_are_valid_are_accepted(client: httpx.AsyncClient) -> None:
    for i, content_type in enumerate(["application/json; charset=utf-8", "Application/JSON", "application/json"]):
        response = await send(client, "POST", "/v1/sessions", json.dumps({"id": f"s{i}"}).encode(), content_type)
        assert response.status_code == 201, (content_type, response.text)

    await create(client, "s")
    response = await client.patch("/v1/sessions/s", content=b'{"title": "x"}', headers=MERGE_PATCH)
    assert response.status_code == 200
    assert response.json()["title"] == "x"

    session_id = "a" * 128
    assert (await client.put(f"/v1/sessions/{session_id}")).status_code == 201
    assert (await client.get(f"/v1/sessions/{session_id}")).status_code == 200


# --- 422: schema violations -----------------------------------------------------------------


@pytest.mark.usefixtures("state")
async def test_unknown_role_is_422(client: httpx.AsyncClient) -> None:
    for role in ("wizard", "User", "", None, 1):
        body = assert_problem(await client.post(MESSAGES, json={"role": role, "content": "x"}), 422)
        assert any("role" in issue["loc"] for issue in body["errors"]), (role, body)
        body = assert_problem(await client.post(BATCH, json={"messages": [{"role": role, "content": "x"}]}), 422)
        assert any("role" in issue["loc"] for issue in body["errors"]), (role, body)


@pytest.mark.usefixtures("state")
async def test_invalid_message_is_422(client: httpx.AsyncClient) -> None:
    bodies: list[Any] = [
        {},
        {"role": "user"},
        {"role": "user", "content": None},
        {"role": "user", "content": ["x"]},
        {"role": "user", "content": "x", "metadata": "x"},
        {"role": "user", "content": "x", "metadata": [1]},
        {"role": "user", "content": "x", "references": "x"},
        {"role": "user", "content": "x", "references": {"doc_id": "d"}},
        {"role": "user", "content": "x", "references": [1, 2]},
        {"role": "user", "content": "x", "seq": 1},
        {"role": "user", "content": "x", "created_at": "2020-01-01T00:00:00Z"},
        [],
        "text",
        1,
        None,
    ]
    failures = [
        problem_mismatch(json.dumps(body), await client.post(MESSAGES, content=json.dumps(body), headers=JSON), 422)
        for body in bodies
    ]
    assert [f for f in failures if f] == []


@pytest.mark.usefixtures("state")
async def test_invalid_session_body_is_422(client: httpx.AsyncClient) -> None:
    bodies: list[Any] = [
        {"title": 5},
        {"title": "x" * 4097},
        {"user_id": "u" * 1025},
        {"user_id": 5},
        {"settings": "x"},
        {"settings": {"options": "x"}},
        {"metadata": []},
        {"metadata": "x"},
        {"id": "a b"},
        {"id": ""},
        {"id": "a" * 129},
        {"id": "../x"},
        {"id": "a.b"},
        {"id": 5},
        [],
        "x",
    ]
    failures = []
    for body in bodies:
        failures.append(problem_mismatch(f"POST {body!r:.60}", await client.post("/v1/sessions", json=body), 422))
        failures.append(problem_mismatch(f"PUT {body!r:.60}", await client.put("/v1/sessions/new", json=body), 422))
    assert [f for f in failures if f] == []


@pytest.mark.usefixtures("state")
async def test_invalid_settings_in_a_patch_is_422(client: httpx.AsyncClient) -> None:
    failures = []
    for settings in ({"model": 5}, {"mode": ["a"]}, {"options": "x"}, {"options": [1]}):
        response = await client.patch("/v1/sessions/s", json={"settings": settings}, headers=MERGE_PATCH)
        failures.append(problem_mismatch(f"settings {settings}", response, 422))
    assert [f for f in failures if f] == []


CONDITIONAL: list[tuple[str, str, dict[str, Any] | None]] = [
    ("PATCH", "/v1/sessions/s", {"title": "x"}),
    ("POST", MESSAGES, {"role": "user", "content": "x"}),
    ("POST", BATCH, {"messages": [{"role": "user", "content": "x"}]}),
    ("DELETE", MESSAGES, None),
    ("DELETE", "/v1/sessions/s", None),
]


async def conditional_failures(client: httpx.AsyncClient, if_match: str) -> list[str | None]:
    failures = []
    for method, path, body in CONDITIONAL:
        content = json.dumps(body).encode() if body is not None else b""
        headers = {**JSON, "If-Match": if_match} if body is not None else {"If-Match": if_match}
        response = await client.request(method, path, content=content, headers=headers)
        failures.append(problem_mismatch(f"{method} {path} If-Match {if_match:.30}", response, 412))
    return failures


@pytest.mark.usefixtures("state")
async def test_if_match_that_can_never_match_is_412(client: httpx.AsyncClient) -> None:
    failures = []
    for if_match in ('"99999999999999999999999999"', '"-1"', '"1.0"', '"0x2"', "W/*", '"*"', 'W/"2"'):
        failures += await conditional_failures(client, if_match)
    assert [f for f in failures if f] == []


@pytest.mark.usefixtures("state")
async def test_if_match_with_thousands_of_digits_is_412(client: httpx.AsyncClient) -> None:
    failures = await conditional_failures(client, '"' + "9" * 5000 + '"')
    assert [f for f in failures if f] == []


BAD_IDS = ["a%20b", "a" * 129, "a.b", "%C3%A9", "a%00", "a%2Fb", "..%2Fx"]


@pytest.mark.usefixtures("state")
@pytest.mark.parametrize(("method", "template", "body"), ID_ROUTES, ids=ID_ROUTE_IDS)
async def test_bad_session_id_is_422(
    client: httpx.AsyncClient, method: str, template: str, body: dict[str, Any] | None
) -> None:
    content = json.dumps(body).encode() if body is not None else b""
    failures = []
    for bad_id in BAD_IDS:
        path = template.replace("{id}", bad_id)
        response = await client.request(method, path, content=content, headers=JSON if body is not None else {})
        # An encoded slash may be taken as a path separator, and then no route matches at all.
        status = 404 if "%2F" in bad_id and response.status_code == 404 else 422
        failures.append(problem_mismatch(f"{method} {path:.60}", response, status))
    assert [f for f in failures if f] == []


# --- size and depth limits ---------------------------------------------------------------------


@pytest.mark.usefixtures("state")
async def test_content_over_max_content_bytes_is_422(client: httpx.AsyncClient) -> None:
    # 2**19 + 1 two-byte characters: under the limit in characters, over it in UTF-8 bytes.
    body = assert_problem(await client.post(MESSAGES, json={"role": "user", "content": "é" * (2**19 + 1)}), 422)
    assert "content" in body["detail"]
    messages = [{"role": "user", "content": "ok"}, {"role": "user", "content": "x" * (2**20 + 1)}]
    assert_problem(await client.post(BATCH, json={"messages": messages}), 422)


async def test_content_of_exactly_max_content_bytes_is_fine(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    response = await client.post(MESSAGES, json={"role": "user", "content": "é" * 2**19})
    assert response.status_code == 201
    assert (await client.get(f"{MESSAGES}/1")).json()["content"] == "é" * 2**19


# Where a JSON object may appear: (method, path, field).
JSON_FIELDS: list[tuple[str, str, str]] = [
    ("POST", MESSAGES, "metadata"),
    ("POST", MESSAGES, "references"),
    ("POST", BATCH, "metadata"),
    ("POST", BATCH, "references"),
    ("POST", "/v1/sessions", "metadata"),
    ("POST", "/v1/sessions", "settings"),
    ("PUT", "/v1/sessions/new", "metadata"),
    ("PUT", "/v1/sessions/new", "settings"),
    ("PATCH", "/v1/sessions/s", "metadata"),
    ("PATCH", "/v1/sessions/s", "settings"),
]


def body_with(path: str, field: str, value: dict[str, Any]) -> dict[str, Any]:
    wrapped: Any = [value] if field == "references" else value
    if path == MESSAGES:
        return {"role": "user", "content": "x", field: wrapped}
    if path == BATCH:
        return {"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "x", field: wrapped}]}
    return {field: wrapped}


def of_depth(field: str, depth: int) -> dict[str, Any]:
    # references is a list of objects, so its objects sit one level deeper.
    return nested(depth - 1 if field == "references" else depth)


@pytest.mark.usefixtures("state")
async def test_json_over_the_limits_is_422(client: httpx.AsyncClient) -> None:
    failures = []
    for method, path, field in JSON_FIELDS:
        for name, value in (
            ("33 deep", of_depth(field, 33)),
            ("64 KiB + 1", {"big": "x" * (64 * 1024 + 1)}),
            ("66,000 UTF-8 bytes in 22,000 characters", {"big": "€" * 22_000}),
        ):
            response = await client.request(method, path, json=body_with(path, field, value))
            failures.append(problem_mismatch(f"{method} {path} {field} {name}", response, 422))
    assert [f for f in failures if f] == []


async def test_json_within_the_limits_is_fine(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    for method, path, field in JSON_FIELDS:
        for name, value in (("32 deep", of_depth(field, 32)), ("60,000 bytes", {"big": "x" * 60_000})):
            response = await client.request(method, path, json=body_with(path, field, value))
            assert response.status_code in (200, 201), (method, path, field, name, response.text)
            if method == "PUT":
                assert (await client.delete(path)).status_code == 204


# --- 413: body over max_body_bytes ---------------------------------------------------------------


@pytest_asyncio.fixture
async def small_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(settings.model_copy(update={"max_body_bytes": 1024})) as app:
        yield app.client


def oversized(valid: dict[str, Any]) -> dict[str, Any]:
    """The valid body with one string made 2,000 characters long."""
    if "messages" in valid:
        return {"messages": [{"role": "user", "content": "x" * 2000}]}
    if "role" in valid:
        return {**valid, "content": "x" * 2000}
    return {**valid, "title": "x" * 2000}


async def test_body_over_max_body_bytes_is_413(small_client: httpx.AsyncClient) -> None:
    await create(small_client, "s")
    await small_client.post(MESSAGES, json={"role": "user", "content": "kept"})
    before = await snapshot(small_client, "s")

    failures = []
    for method, path, valid in BODY_ROUTES:
        raw = json.dumps(oversized(valid)).encode()
        assert len(raw) > 1024

        async def stream(raw: bytes = raw) -> AsyncIterator[bytes]:
            for start in range(0, len(raw), 100):
                yield raw[start : start + 100]

        response = await small_client.request(method, path, content=raw, headers=JSON)
        failures.append(problem_mismatch(f"{method} {path} with Content-Length", response, 413))
        response = await small_client.request(method, path, content=stream(), headers=JSON)
        failures.append(problem_mismatch(f"{method} {path} chunked", response, 413))
    assert [f for f in failures if f] == []

    assert await snapshot(small_client, "s") == before
    assert_problem(await small_client.get("/v1/sessions/new"), 404)
    assert len((await small_client.get("/v1/sessions")).json()["items"]) == 1


async def test_body_at_max_body_bytes_is_fine(small_client: httpx.AsyncClient) -> None:
    await create(small_client, "s")
    prefix, suffix = b'{"role": "user", "content": "', b'"}'
    raw = prefix + b"x" * (1024 - len(prefix) - len(suffix)) + suffix
    assert len(raw) == 1024
    response = await small_client.post(MESSAGES, content=raw, headers=JSON)
    assert response.status_code == 201, response.text


# --- routing errors ---------------------------------------------------------------------------------


async def test_routing_errors_are_problems(client: httpx.AsyncClient) -> None:
    paths = ["/nope", "/v1", "/v1/session", "/v2/sessions", "/v1/sessions/s/messages/1/extra", "/v1/sessions/s/nope"]
    failures = [problem_mismatch(path, await client.get(path), 404) for path in paths]

    cases = [
        ("PUT", "/v1/sessions"),
        ("PATCH", "/v1/sessions"),
        ("POST", "/v1/sessions/s"),
        ("PUT", "/v1/sessions/s/messages"),
        ("PATCH", "/v1/sessions/s/messages"),
        ("POST", "/v1/sessions/s/messages/1"),
        ("POST", "/healthz"),
    ]
    for method, path in cases:
        response = await client.request(method, path)
        failures.append(problem_mismatch(f"{method} {path}", response, 405))
        allow = response.headers.get("allow", "")
        if not allow or method in allow:
            failures.append(f"{method} {path}: Allow header {allow!r}")
    assert [f for f in failures if f] == []
