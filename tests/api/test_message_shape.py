"""HTTP tests of the message shape: content parts, tool calls, names, message ids, status, limits.

The contract suite (tests/storage/test_contract_shape.py) holds the same on every
store; here the wire: what the API answers, the 409 `message-exists`, and every
bad input as a 422 naming its field with nothing stored.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from chatsessions.config import Settings
from tests.api.support import assert_problem, create, problem_mismatch, running_app, snapshot
from tests.storage.test_contract_shape import CONVERSATION, FIELDS

pytestmark = pytest.mark.asyncio

MESSAGES = "/v1/sessions/s/messages"
BATCH = "/v1/sessions/s/messages/batch"


def call(i: int) -> dict[str, Any]:
    return {"id": f"c{i}", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
async def test_an_openai_conversation_round_trips_over_http(store: str, tmp_path: Any) -> None:
    from tests.conftest import drop_postgres_schema, make_settings

    settings = make_settings(store, tmp_path)
    try:
        async with running_app(settings) as app:
            await create(app.client, "s")
            appended = await app.client.post(BATCH, json={"messages": CONVERSATION})
            assert appended.status_code == 201, appended.text
            page = await app.client.get(MESSAGES)
            one = [(await app.client.get(f"{MESSAGES}/{seq}")).json() for seq in range(1, len(CONVERSATION) + 1)]
            for answer in (appended.json()["items"], page.json()["items"], one):
                for sent, got in zip(CONVERSATION, answer, strict=True):
                    assert {f: got[f] for f in FIELDS} == {f: sent.get(f) for f in FIELDS}
    finally:
        await drop_postgres_schema(settings)


async def test_the_v1_shape_answers_as_before_with_the_new_fields_at_their_defaults(
    client: httpx.AsyncClient,
) -> None:
    await create(client, "s")
    response = await client.post(MESSAGES, json={"role": "user", "content": "hi", "metadata": {"k": 1}})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["content"] == "hi"
    assert body["metadata"] == {"k": 1}
    assert (body["id"], body["name"], body["tool_calls"], body["tool_call_id"]) == (None, None, None, None)
    assert body["status"] == "completed"
    assert body["updated_at"] == body["created_at"]


async def test_content_parts_keep_what_was_given(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    parts = [
        {"type": "text", "text": "see", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "url": "https://x/y.png"},
        {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}},
    ]
    response = await client.post(MESSAGES, json={"role": "user", "content": parts})
    assert response.status_code == 201, response.text
    assert response.json()["content"] == parts  # no member added (no nulls for unset ones), none dropped


async def test_a_message_id_the_session_has_is_a_409_naming_its_seq(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    first = await client.post(MESSAGES, json={"role": "user", "content": "a", "id": "m1"})
    assert first.status_code == 201, first.text
    before = await snapshot(client, "s")
    for url, body in (
        (MESSAGES, {"role": "user", "content": "b", "id": "m1"}),
        (
            BATCH,
            {"messages": [{"role": "user", "content": "c", "id": "m2"}, {"role": "user", "content": "d", "id": "m1"}]},
        ),
    ):
        response = await client.post(url, json=body)
        problem = assert_problem(response, 409)
        assert problem["type"].endswith("/message-exists")
        assert "m1" in problem["detail"]
        assert "message 1" in problem["detail"]
        assert "retry-after" not in response.headers  # retrying cannot help
    assert await snapshot(client, "s") == before


async def test_a_retried_keyed_append_with_an_id_replays_instead_of_conflicting(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    body = {"role": "user", "content": "a", "id": "m1"}
    headers = {"Idempotency-Key": "k1"}
    first = await client.post(MESSAGES, json=body, headers=headers)
    again = await client.post(MESSAGES, json=body, headers=headers)
    assert (first.status_code, again.status_code) == (201, 201)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()


async def test_search_finds_the_words_of_text_parts(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    parts = [{"type": "text", "text": "zebra crossing"}, {"type": "image", "url": "https://x/quokka.png"}]
    await client.post(MESSAGES, json={"role": "user", "content": parts})
    found = await client.get("/v1/search", params={"q": "zebra"})
    assert [hit["seq"] for hit in found.json()["items"]] == [1]
    assert (await client.get("/v1/search", params={"q": "quokka"})).json()["items"] == []


def _bad_inputs(settings: Settings) -> list[tuple[str, dict[str, Any], tuple[Any, ...]]]:
    """(label, message, the loc the 422 must name) for every kind of bad new field."""
    big = settings.max_content_bytes
    over_part = "x" * (settings.max_json_bytes + 1)
    return [
        ("role", {"role": "critic", "content": "x"}, ("body", "role")),
        ("content type", {"role": "user", "content": 5}, ("body", "content")),
        ("empty parts", {"role": "user", "content": []}, ("body", "content")),
        ("101 parts", {"role": "user", "content": [{"type": "text", "text": "x"}] * 101}, ("body", "content")),
        ("part without type", {"role": "user", "content": [{"text": "x"}]}, ("body", "content", 0, "type")),
        ("part type", {"role": "user", "content": [{"type": 3}]}, ("body", "content", 0, "type")),
        ("part not an object", {"role": "user", "content": ["x"]}, ("body", "content", 0)),
        ("text without text", {"role": "user", "content": [{"type": "text"}]}, ("body", "content", 0, "text")),
        (
            "text not a string",
            {"role": "user", "content": [{"type": "text", "text": 1}]},
            ("body", "content", 0, "text"),
        ),
        ("image without url", {"role": "user", "content": [{"type": "image"}]}, ("body", "content", 0, "url")),
        ("file name type", {"role": "user", "content": [{"type": "file", "name": 1}]}, ("body", "content", 0, "name")),
        (
            "oversized part",
            {"role": "user", "content": [{"type": "image", "url": over_part}]},
            ("body", "content", 0),
        ),
        (
            "parts' text over the content limit",
            {"role": "user", "content": [{"type": "text", "text": "x" * (big // 2 + 1)}] * 2},
            ("body", "content"),
        ),
        ("null content on a user message", {"role": "user", "content": None}, ("body", "content")),
        ("null content without tool calls", {"role": "assistant", "content": None}, ("body", "content")),
        ("no content", {"role": "tool", "tool_call_id": "c"}, ("body", "content")),
        ("tool_calls type", {"role": "assistant", "content": "x", "tool_calls": {}}, ("body", "tool_calls")),
        (
            "129 tool calls",
            {"role": "assistant", "content": None, "tool_calls": [call(i) for i in range(129)]},
            ("body", "tool_calls"),
        ),
        (
            "tool call type",
            {"role": "assistant", "content": None, "tool_calls": [{**call(0), "type": "x"}]},
            ("body", "tool_calls", 0, "type"),
        ),
        (
            "arguments not a string",
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call(0), "function": {"name": "f", "arguments": {}}}],
            },
            ("body", "tool_calls", 0, "function", "arguments"),
        ),
        (
            "tool call without id",
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": call(0)["function"]}],
            },
            ("body", "tool_calls", 0, "id"),
        ),
        (
            "oversized tool call",
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call(0), "function": {"name": "f", "arguments": over_part}}],
            },
            ("body", "tool_calls", 0),
        ),
        ("name type", {"role": "user", "content": "x", "name": 1}, ("body", "name")),
        ("name 257", {"role": "user", "content": "x", "name": "n" * 257}, ("body", "name")),
        ("tool_call_id 257", {"role": "tool", "content": "x", "tool_call_id": "n" * 257}, ("body", "tool_call_id")),
        ("id pattern", {"role": "user", "content": "x", "id": "a b"}, ("body", "id")),
        ("id 129", {"role": "user", "content": "x", "id": "a" * 129}, ("body", "id")),
        ("id type", {"role": "user", "content": "x", "id": 7}, ("body", "id")),
        ("status", {"role": "user", "content": "x", "status": "done"}, ("body", "status")),
    ]


async def test_every_bad_new_field_is_a_422_naming_it_and_nothing_is_stored(settings: Settings) -> None:
    async with running_app(settings) as app:
        client = app.client
        await create(client, "s")
        before = await snapshot(client, "s")
        failures: list[str] = []
        for label, message, loc in _bad_inputs(settings):
            for url, body, where in (
                (MESSAGES, message, loc),
                (BATCH, {"messages": [{"role": "user", "content": "ok"}, message]}, ("body", "messages", 1, *loc[1:])),
            ):
                response = await client.post(url, json=body)
                mismatch = problem_mismatch(f"{label} ({url})", response, 422)
                if mismatch is not None:
                    failures.append(mismatch)
                    continue
                locs = [tuple(issue["loc"]) for issue in response.json()["errors"]]
                if where not in locs:
                    failures.append(f"{label} ({url}): no issue at {where}, got {locs}")
        assert not failures, "\n".join(failures)
        assert await snapshot(client, "s") == before


async def test_a_batch_repeating_an_id_is_a_409(client: httpx.AsyncClient) -> None:
    await create(client, "s")
    twice = {"messages": [{"role": "user", "content": "a", "id": "m"}, {"role": "user", "content": "b", "id": "m"}]}
    problem = assert_problem(await client.post(BATCH, json=twice), 409)
    assert problem["type"].endswith("/message-exists")
    assert (await client.get(MESSAGES)).json()["items"] == []


async def test_the_largest_valid_new_fields_are_accepted(settings: Settings, client: httpx.AsyncClient) -> None:
    await create(client, "s")
    message = {
        "role": "assistant",
        "content": [{"type": "text", "text": "x"}] * 100,
        "tool_calls": [call(i) for i in range(128)],
        "name": "n" * 256,
        "id": "i" * 128,
    }
    response = await client.post(MESSAGES, json=message)
    assert response.status_code == 201, response.text
    tool = {"role": "tool", "content": "x" * settings.max_content_bytes, "tool_call_id": "t" * 256}
    assert (await client.post(MESSAGES, json=tool)).status_code == 201
