"""The OpenAPI document: every operation is described, typed, and lists the errors it can give."""

from __future__ import annotations

import inspect
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fastapi.routing import APIRoute, iter_route_contexts

from chatsessions.config import Settings
from chatsessions.main import create_app
from tests.api.support import PROBLEM_JSON

pytestmark = pytest.mark.asyncio

S = "/v1/sessions"
ONE = "/v1/sessions/{session_id}"
MSGS = "/v1/sessions/{session_id}/messages"

# (method, path) → (success statuses, error statuses DESIGN.md documents for it).
DOCUMENTED: dict[tuple[str, str], tuple[set[str], set[str]]] = {
    ("post", S): ({"201"}, {"400", "409", "413", "415", "422"}),
    ("get", S): ({"200"}, {"422"}),
    ("put", ONE): ({"200", "201"}, {"400", "413", "415", "422"}),
    ("get", ONE): ({"200"}, {"404", "422"}),
    ("patch", ONE): ({"200"}, {"400", "404", "412", "413", "415", "422"}),
    ("delete", ONE): ({"204"}, {"404", "412"}),
    ("post", MSGS): ({"201"}, {"400", "404", "409", "412", "413", "415", "422"}),
    ("post", MSGS + "/batch"): ({"201"}, {"400", "404", "409", "412", "413", "415", "422"}),
    ("get", MSGS): ({"200"}, {"404", "422"}),
    ("get", MSGS + "/{seq}"): ({"200"}, {"404", "422"}),
    ("delete", MSGS): ({"204"}, {"404", "412"}),
    ("delete", S): ({"200"}, {"422"}),
    ("delete", MSGS + "/{seq}"): ({"204"}, {"404", "412"}),
    ("get", "/v1/export"): ({"200"}, {"422"}),
    ("post", "/v1/import"): ({"200"}, {"400", "413", "422"}),
    ("get", "/v1/search"): ({"200"}, {"422"}),
    ("get", "/v1/citations"): ({"200"}, {"422"}),
    ("post", MSGS + "/{seq}/deltas"): ({"200"}, {"400", "404", "409", "412", "413", "415", "422"}),
    ("patch", MSGS + "/{seq}"): ({"200"}, {"400", "404", "409", "412", "413", "415", "422"}),
    ("get", ONE + "/events"): ({"200"}, {"400", "404", "422", "503"}),
    ("get", "/v1/events"): ({"200"}, {"422", "503"}),
    ("get", "/healthz"): ({"200"}, set()),
    ("get", "/readyz"): ({"200"}, {"503"}),
    ("get", "/metrics"): ({"200"}, set()),
}

# Response models of the success answers.
MODELS: dict[tuple[str, str], str] = {
    ("post", S): "Session",
    ("get", S): "SessionPage",
    ("put", ONE): "Session",
    ("get", ONE): "Session",
    ("patch", ONE): "Session",
    ("post", MSGS): "Message",
    ("post", MSGS + "/batch"): "MessageBatch",
    ("get", MSGS): "MessagePage",
    ("get", MSGS + "/{seq}"): "Message",
    ("patch", MSGS + "/{seq}"): "Message",
    ("post", MSGS + "/{seq}/deltas"): "MessageDeltaAck",
    ("delete", S): "DeletedCount",
    ("post", "/v1/import"): "ImportSummary",
    ("get", "/v1/search"): "SearchPage",
    ("get", "/v1/citations"): "CitationPage",
}

IF_MATCH = {
    ("patch", ONE),
    ("delete", ONE),
    ("post", MSGS),
    ("post", MSGS + "/batch"),
    ("delete", MSGS),
    ("post", MSGS + "/{seq}/deltas"),
    ("patch", MSGS + "/{seq}"),
    ("delete", MSGS + "/{seq}"),
}
IDEMPOTENT = {("post", S), ("post", MSGS), ("post", MSGS + "/batch"), ("post", MSGS + "/{seq}/deltas")}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest_asyncio.fixture
async def spec(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    }


async def test_every_documented_operation_exists_and_nothing_else(spec: dict[str, Any]) -> None:
    assert set(operations(spec)) == set(DOCUMENTED)


async def test_every_operation_has_summary_tags_and_a_unique_id(spec: dict[str, Any]) -> None:
    ops = operations(spec)
    declared_tags = {tag["name"] for tag in spec.get("tags", [])}
    for key, operation in ops.items():
        assert isinstance(operation.get("summary"), str), key
        assert operation["summary"].strip(), key
        assert operation.get("tags"), key
        assert set(operation["tags"]) <= declared_tags, key
    ids = [operation["operationId"] for operation in ops.values()]
    assert len(ids) == len(set(ids))


async def test_success_responses_have_models(spec: dict[str, Any]) -> None:
    for key, operation in operations(spec).items():
        successes, _ = DOCUMENTED[key]
        responses = operation["responses"]
        assert successes <= set(responses), (key, sorted(responses))
        for status in successes:
            if key == ("get", "/metrics"):
                assert set(responses[status]["content"]) == {"text/plain; version=0.0.4; charset=utf-8"}
                continue
            if status == "204":
                assert not responses[status].get("content"), key
                continue
            if key == ("get", "/v1/export"):
                assert set(responses[status]["content"]) == {"application/x-ndjson"}
                continue
            content = responses[status]["content"]
            # The change feeds answer a stream of Server-Sent Events, not JSON.
            schema = (content.get("application/json") or content["text/event-stream"])["schema"]
            if key in MODELS:
                assert schema == {"$ref": f"#/components/schemas/{MODELS[key]}"}, (key, status, schema)
            else:
                assert schema.get("$ref") or schema.get("type"), (key, status, schema)


async def test_documented_errors_are_problem_json(spec: dict[str, Any]) -> None:
    problem_ref = {"$ref": "#/components/schemas/Problem"}
    for key, operation in operations(spec).items():
        _, errors = DOCUMENTED[key]
        responses = operation["responses"]
        missing = errors - set(responses)
        assert not missing, (key, sorted(missing))
        for status, response in responses.items():
            if status[0] not in "45":
                continue
            assert set(response.get("content", {})) == {PROBLEM_JSON}, (key, status, response)
            assert response["content"][PROBLEM_JSON]["schema"] == problem_ref, (key, status)
            assert response.get("description"), (key, status)


async def test_problem_schema(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    problem = schemas["Problem"]
    assert {"type", "title", "status", "detail"} <= set(problem["required"])
    assert "errors" in problem["properties"]
    assert "HTTPValidationError" not in schemas, "FastAPI's own 422 shape must not be documented"


async def test_patch_documents_both_media_types(spec: dict[str, Any]) -> None:
    content = spec["paths"][ONE]["patch"]["requestBody"]["content"]
    assert {"application/merge-patch+json", "application/json"} <= set(content)
    for media in content.values():
        assert media["schema"] == {"$ref": "#/components/schemas/SessionPatch"}


async def test_request_bodies_have_models(spec: dict[str, Any]) -> None:
    expected = {
        ("post", S): "SessionCreate",
        ("put", ONE): "SessionPut",
        ("post", MSGS): "MessageCreate",
        ("post", MSGS + "/batch"): "MessageBatchCreate",
    }
    ops = operations(spec)
    for key, model in expected.items():
        schema = ops[key]["requestBody"]["content"]["application/json"]["schema"]
        refs = [schema.get("$ref")] + [s.get("$ref") for s in schema.get("anyOf", [])]
        assert f"#/components/schemas/{model}" in refs, (key, schema)


async def test_headers_are_documented(spec: dict[str, Any]) -> None:
    for key, operation in operations(spec).items():
        headers = {p["name"].lower() for p in operation.get("parameters", []) if p["in"] == "header"}
        assert ("if-match" in headers) is (key in IF_MATCH), (key, headers)
        assert ("idempotency-key" in headers) is (key in IDEMPOTENT), (key, headers)


async def test_limits_are_in_the_schema(spec: dict[str, Any]) -> None:
    ops = operations(spec)

    def param(key: tuple[str, str], name: str) -> dict[str, Any]:
        (found,) = [p for p in ops[key].get("parameters", []) if p["name"] == name]
        schema: dict[str, Any] = found["schema"]
        return schema

    assert (param(("get", S), "limit")["minimum"], param(("get", S), "limit")["maximum"]) == (1, 100)
    assert (param(("get", MSGS), "limit")["minimum"], param(("get", MSGS), "limit")["maximum"]) == (1, 1000)
    assert set(param(("get", MSGS), "order").get("enum", [])) | set(
        spec["components"]["schemas"].get("Order", {}).get("enum", [])
    ) == {"asc", "desc"}
    batch = spec["components"]["schemas"]["MessageBatchCreate"]["properties"]["messages"]
    assert (batch["minItems"], batch["maxItems"]) == (1, 100)
    key = param(("post", MSGS), "idempotency-key")
    variants = [key, *key.get("anyOf", [])]
    assert any(v.get("maxLength") == 255 and v.get("minLength") == 1 for v in variants), key
    role = spec["components"]["schemas"]["Role"]
    assert set(role["enum"]) == {"system", "developer", "user", "assistant", "tool"}


async def test_summaries_are_the_handler_docstrings(settings: Settings) -> None:
    app = create_app(settings)
    spec = app.openapi()
    mismatches = []
    routes = [context.original_route for context in iter_route_contexts(app.routes)]
    assert len(routes) > 10
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        docstring = inspect.getdoc(route.endpoint) or ""
        for method in route.methods or ():
            summary = spec["paths"][route.path_format][method.lower()].get("summary")
            if summary != docstring.splitlines()[0]:
                mismatches.append(f"{method} {route.path_format}: {summary!r} vs docstring {docstring!r}")
    assert mismatches == []


# (method, path, status) → the response headers the operation declares.
RESPONSE_HEADERS: dict[tuple[str, str, str], set[str]] = {
    ("post", S, "201"): {"Location", "ETag", "Idempotent-Replayed"},
    ("put", ONE, "200"): {"ETag"},
    ("put", ONE, "201"): {"Location", "ETag"},
    ("get", ONE, "200"): {"ETag"},
    ("patch", ONE, "200"): {"ETag"},
    ("patch", ONE, "412"): {"ETag"},
    ("post", MSGS, "201"): {"Location", "ETag", "Idempotent-Replayed"},
    ("post", MSGS, "412"): {"ETag"},
    ("post", MSGS, "503"): {"Retry-After"},
    ("post", MSGS + "/batch", "201"): {"ETag", "Idempotent-Replayed"},
    ("delete", MSGS, "204"): {"ETag"},
    ("get", "/readyz", "503"): {"Retry-After"},
}


async def test_response_headers_are_declared(spec: dict[str, Any]) -> None:
    ops = operations(spec)
    for (method, path, status), names in RESPONSE_HEADERS.items():
        declared = set(ops[(method, path)]["responses"][status].get("headers", {}))
        assert names <= declared, (method, path, status, declared)


async def test_operation_ids_are_the_handler_names(spec: dict[str, Any]) -> None:
    ids = {key: operation["operationId"] for key, operation in operations(spec).items()}
    assert ids[("post", S)] == "create_session"
    assert ids[("post", MSGS)] == "append_message"
    assert ids[("post", MSGS + "/batch")] == "append_messages"
    assert ids[("get", MSGS)] == "list_messages"
    assert all(name.isidentifier() and len(name) <= 20 for name in ids.values()), ids


async def test_always_present_fields_are_required(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    session = schemas["Session"]
    assert set(session["properties"]) == set(session["required"])
    assert {"version", "message_count", "last_seq", "settings", "metadata"} <= set(session["required"])
    for name in ("Message", "SessionPage", "MessagePage", "MessageBatch"):
        assert set(schemas[name]["properties"]) == set(schemas[name]["required"]), name
    answer_settings = session["properties"]["settings"]
    assert "required" not in answer_settings
    assert answer_settings["properties"]["model"] == {"type": "string"}  # absent, never null


async def test_put_body_has_no_id(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    assert "id" not in schemas["SessionPut"]["properties"]
    assert "id" in schemas["SessionCreate"]["properties"]


async def test_if_match_and_cursor_state_their_syntax(spec: dict[str, Any]) -> None:
    ops = operations(spec)
    (if_match,) = [p for p in ops[("patch", ONE)]["parameters"] if p["name"] == "if-match"]
    variants = [if_match["schema"], *if_match["schema"].get("anyOf", [])]
    assert any(v.get("type") == "string" and v.get("maxLength") for v in variants), if_match
    (cursor,) = [p for p in ops[("get", S)]["parameters"] if p["name"] == "cursor"]
    variants = [cursor["schema"], *cursor["schema"].get("anyOf", [])]
    assert any(v.get("pattern") and v.get("maxLength") for v in variants), cursor
