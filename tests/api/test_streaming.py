"""The streaming routes over HTTP: deltas (ack, ETag, If-Match, Idempotency-Key, errors) and the finishing PATCH."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from chatsessions.config import Settings
from tests.conftest import make_settings
from tests.server.proc import free_port, running_server, server_env

pytestmark = pytest.mark.asyncio


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings("sqlite", tmp_path, max_content_bytes=100)


async def open_stream(client: httpx.AsyncClient) -> tuple[str, int]:
    sid = (await client.post("/v1/sessions", json={})).json()["id"]
    body = {"role": "assistant", "content": "", "status": "in_progress"}
    response = await client.post(f"/v1/sessions/{sid}/messages", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "in_progress"
    return sid, response.json()["seq"]


async def test_a_delta_is_acknowledged_with_the_version_and_readable(client: httpx.AsyncClient) -> None:
    sid, seq = await open_stream(client)
    response = await client.post(f"/v1/sessions/{sid}/messages/{seq}/deltas", json={"content": "Hi"})
    assert response.status_code == 200
    assert response.json() == {"seq": seq, "version": 3}
    assert response.headers["ETag"] == '"3"'
    message = (await client.get(f"/v1/sessions/{sid}/messages/{seq}")).json()
    assert (message["content"], message["status"]) == ("Hi", "in_progress")


async def test_a_retried_delta_never_doubles_the_text(client: httpx.AsyncClient) -> None:
    sid, seq = await open_stream(client)
    path = f"/v1/sessions/{sid}/messages/{seq}/deltas"
    first = await client.post(path, json={"content": "once"}, headers={"Idempotency-Key": "d-1"})
    again = await client.post(path, json={"content": "once"}, headers={"Idempotency-Key": "d-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (await client.get(f"/v1/sessions/{sid}/messages/{seq}")).json()["content"] == "once"


async def test_a_stale_if_match_is_412_and_a_current_one_applies(client: httpx.AsyncClient) -> None:
    sid, seq = await open_stream(client)
    path = f"/v1/sessions/{sid}/messages/{seq}/deltas"
    stale = await client.post(path, json={"content": "a"}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    current = await client.post(path, json={"content": "a"}, headers={"If-Match": '"2"'})
    assert current.status_code == 200


async def test_bad_deltas_answer_problems_and_change_nothing(client: httpx.AsyncClient) -> None:
    sid, seq = await open_stream(client)
    path = f"/v1/sessions/{sid}/messages/{seq}/deltas"
    assert (await client.post(path, json={"content": "x" * 90})).status_code == 200
    too_big = await client.post(path, json={"content": "y" * 20})
    assert too_big.status_code == 422
    missing = await client.post(f"/v1/sessions/{sid}/messages/{seq + 5}/deltas", json={"content": "y"})
    assert missing.status_code == 404
    assert missing.json()["type"].endswith("/message-not-found")
    no_session = await client.post(f"/v1/sessions/nope/messages/{seq}/deltas", json={"content": "y"})
    assert no_session.status_code == 404
    assert (await client.post(path, json={"content": 5})).status_code == 422
    assert (await client.post(path, json={"content": "y", "extra": 1})).status_code == 422
    message = (await client.get(f"/v1/sessions/{sid}/messages/{seq}")).json()
    assert message["content"] == "x" * 90
    assert (await client.get(f"/v1/sessions/{sid}")).json()["version"] == 3


async def test_patch_finishes_the_message_and_then_it_is_immutable(client: httpx.AsyncClient) -> None:
    sid, seq = await open_stream(client)
    await client.post(f"/v1/sessions/{sid}/messages/{seq}/deltas", json={"content": "The answer"})
    patch = {"status": "completed", "metadata": {"tokens": 2}, "name": "bot"}
    done = await client.patch(
        f"/v1/sessions/{sid}/messages/{seq}", json=patch, headers={"content-type": "application/merge-patch+json"}
    )
    assert done.status_code == 200, done.text
    assert done.headers["ETag"] == '"4"'
    body = done.json()
    assert (body["status"], body["content"], body["metadata"], body["name"]) == (
        "completed",
        "The answer",
        {"tokens": 2},
        "bot",
    )
    for late in (
        client.post(f"/v1/sessions/{sid}/messages/{seq}/deltas", json={"content": "!"}),
        client.patch(f"/v1/sessions/{sid}/messages/{seq}", json={"content": "changed"}),
    ):
        refused = await late
        assert refused.status_code == 409
        assert refused.json()["type"].endswith("/message-not-in-progress")
    found = await client.get("/v1/search", params={"q": "answer"})
    assert [(h["session_id"], h["seq"]) for h in found.json()["items"]] == [(sid, seq)]


async def test_an_abandoned_stream_is_marked_incomplete_after_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = free_port()
    with running_server(server_env(CHATSESSIONS_DATA_DIR=data), port) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            sid, seq = await open_stream(client)
            await client.post(f"/v1/sessions/{sid}/messages/{seq}/deltas", json={"content": "half an ans"})
    # The writer went away mid-answer. A new process with a short idle timeout ends it by itself.
    env = server_env(CHATSESSIONS_DATA_DIR=data, CHATSESSIONS_STREAM_IDLE_SECONDS="0.5")
    with running_server(env, port) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            deadline = time.monotonic() + 30
            message = {}
            while time.monotonic() < deadline:
                message = (await client.get(f"/v1/sessions/{sid}/messages/{seq}")).json()
                if message["status"] != "in_progress":
                    break
                await asyncio.sleep(0.1)
            async with client.stream("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": "3"}) as feed:
                lines = []
                async for line in feed.aiter_lines():
                    lines.append(line)
                    if line.startswith("data:"):
                        break
    assert message["status"] == "incomplete"
    assert message["content"] == "half an ans"
    assert "event: message.updated" in lines
    assert "id: 4" in lines
