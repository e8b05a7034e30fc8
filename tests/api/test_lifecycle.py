"""HTTP tests of the lifecycle routes: deleting one message, retention fields, erasure, export/import."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import httpx
import pytest

from chatsessions.models import utcnow

pytestmark = pytest.mark.asyncio


def soon(seconds: float) -> str:
    return (utcnow() + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


async def test_delete_one_message(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/sessions", json={"id": "s"})).status_code == 201
    batch = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    assert (await client.post("/v1/sessions/s/messages/batch", json=batch)).status_code == 201
    stale = await client.delete("/v1/sessions/s/messages/1", headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    deleted = await client.delete("/v1/sessions/s/messages/1", headers={"If-Match": '"2"'})
    assert deleted.status_code == 204
    assert deleted.headers["ETag"] == '"3"'
    assert (await client.delete("/v1/sessions/s/messages/1")).status_code == 404
    assert (await client.delete("/v1/sessions/nope/messages/1")).status_code == 404
    assert (await client.get("/v1/sessions/s/messages/1")).status_code == 404
    page = (await client.get("/v1/sessions/s/messages")).json()
    assert [m["seq"] for m in page["items"]] == [2]
    assert not page["has_more"]
    session = (await client.get("/v1/sessions/s")).json()
    assert (session["message_count"], session["last_seq"], session["version"]) == (1, 2, 3)


async def test_expires_at_must_lie_in_the_future(client: httpx.AsyncClient) -> None:
    past = (utcnow() - timedelta(seconds=1)).isoformat()
    for body in ({"expires_at": past}, {"expires_at": "tomorrow"}, {"expires_at": "2030-01-01T00:00:00"}):
        assert (await client.post("/v1/sessions", json=body)).status_code == 422, body
        assert (await client.put("/v1/sessions/p", json=body)).status_code == 422, body
    assert (await client.post("/v1/sessions", json={"id": "s", "pinned": True})).status_code == 201
    assert (await client.patch("/v1/sessions/s", json={"expires_at": past})).status_code == 422
    later = soon(3600)
    patched = await client.patch("/v1/sessions/s", json={"expires_at": later, "pinned": None})
    assert patched.status_code == 200
    assert patched.json()["pinned"] is False
    assert patched.json()["expires_at"] is not None
    removed = await client.patch("/v1/sessions/s", json={"expires_at": None})
    assert removed.json()["expires_at"] is None
    listed = await client.get("/v1/sessions", params={"pinned": "false"})
    assert [s["id"] for s in listed.json()["items"]] == ["s"]


async def test_an_expired_session_answers_404(client: httpx.AsyncClient) -> None:
    created = await client.post("/v1/sessions", json={"id": "s", "expires_at": soon(0.3)})
    assert created.status_code == 201
    await asyncio.sleep(0.4)
    assert (await client.get("/v1/sessions/s")).status_code == 404
    assert (await client.get("/v1/sessions/s/messages")).status_code == 404
    assert (await client.post("/v1/sessions/s/messages", json={"role": "user", "content": "x"})).status_code == 404
    assert (await client.get("/v1/sessions")).json()["items"] == []


async def test_bulk_delete_needs_a_user(client: httpx.AsyncClient) -> None:
    for sid, user in (("a", "u"), ("b", "u"), ("c", "v")):
        assert (await client.post("/v1/sessions", json={"id": sid, "user_id": user})).status_code == 201
    refused = await client.delete("/v1/sessions")
    assert refused.status_code == 422
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert len((await client.get("/v1/sessions")).json()["items"]) == 3
    erased = await client.delete("/v1/sessions", params={"user_id": "u"})
    assert erased.status_code == 200
    assert erased.json() == {"deleted": 2}
    assert [s["id"] for s in (await client.get("/v1/sessions")).json()["items"]] == ["c"]
    none = await client.delete("/v1/sessions", params={"user_id": "v", "document_id": "other"})
    assert none.json() == {"deleted": 0}
