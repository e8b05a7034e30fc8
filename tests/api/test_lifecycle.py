"""HTTP tests of the lifecycle routes: deleting one message, retention fields, erasure, export/import."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from chatsessions.models import utcnow
from tests.api.support import running_app
from tests.conftest import make_settings

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


# --- export and import ----------------------------------------------------------------------


async def _fill(client: httpx.AsyncClient) -> None:
    for sid, user in (("b", "u1"), ("a", "u2"), ("c", "u1")):
        body = {"id": sid, "user_id": user, "title": f"t-{sid}", "metadata": {"n": [1, {"x": None}]}, "pinned": True}
        assert (await client.post("/v1/sessions", json=body)).status_code == 201
        batch = {
            "messages": [
                {"role": "user", "content": f"{sid} one", "references": [{"doc_id": "d", "page": 3}]},
                {"role": "assistant", "content": f"{sid} two", "metadata": {"k": "v"}},
                {"role": "user", "content": f"{sid} three"},
            ]
        }
        assert (await client.post(f"/v1/sessions/{sid}/messages/batch", json=batch)).status_code == 201
    assert (await client.delete("/v1/sessions/b/messages/2")).status_code == 204
    assert (await client.patch("/v1/sessions/c", json={"expires_at": soon(3600)})).status_code == 200


async def _export(client: httpx.AsyncClient, **params: str) -> list[str]:
    response = await client.get("/v1/export", params=params)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    return response.text.splitlines()


def _import_body(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


async def test_export_then_import_into_an_empty_store_gives_the_same_lines(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    await _fill(client)
    lines = await _export(client)
    assert len(lines) == 1 + 3 + 8
    header = json.loads(lines[0])
    assert (header["format"], header["version"]) == ("chatsessions.export", 1)
    assert [json.loads(line)["session"]["id"] for line in lines if '"type":"session"' in line] == ["a", "b", "c"]
    assert [json.loads(line)["message"]["seq"] for line in lines[6:8]] == [1, 3]  # b's gap stays
    assert len(await _export(client, user_id="u1")) == 1 + 2 + 5
    assert len(await _export(client, session_id="a")) == 1 + 1 + 3

    async with running_app(make_settings("sqlite", tmp_path / "other")) as other:
        imported = await other.client.post("/v1/import", content=_import_body(lines))
        assert imported.status_code == 200, imported.text
        assert imported.json() == {"sessions": 3, "messages": 8, "skipped": [], "replaced": []}
        again = await _export(other.client)
        assert again[1:] == lines[1:]
        assert {k: v for k, v in json.loads(again[0]).items() if k != "exported_at"} == {
            "format": "chatsessions.export",
            "version": 1,
        }
        twice = await other.client.post("/v1/import", content=_import_body(lines))
        assert twice.json() == {"sessions": 0, "messages": 0, "skipped": ["a", "b", "c"], "replaced": []}
        assert (await _export(other.client))[1:] == lines[1:]
        replaced = await other.client.post("/v1/import", params={"on_conflict": "replace"}, content=_import_body(lines))
        assert replaced.json() == {"sessions": 3, "messages": 8, "skipped": [], "replaced": ["a", "b", "c"]}
        assert (await _export(other.client))[1:] == lines[1:]
        appended = await other.client.post("/v1/sessions/b/messages", json={"role": "user", "content": "x"})
        assert appended.json()["seq"] == 4


async def test_a_malformed_line_is_named_and_stops_the_import(client: httpx.AsyncClient, tmp_path: Path) -> None:
    await _fill(client)
    lines = await _export(client)
    async with running_app(make_settings("sqlite", tmp_path / "other")) as other:
        broken = [*lines[:7], "{not json", *lines[7:]]  # inside session b, after its first message
        answer = await other.client.post("/v1/import", content=_import_body(broken))
        assert answer.status_code == 400
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert "line 8" in answer.json()["detail"]
        ids = [s["id"] for s in (await other.client.get("/v1/sessions")).json()["items"]]
        assert ids == ["a"]  # finished before the line; b (interrupted) and c (after) are not imported

        for bad, number in (
            ([*lines[:2], '{"type": "other"}'], 3),
            (['{"format": "something else", "version": 1}', *lines[1:]], 1),
            ([lines[0], lines[2]], 2),  # a message before any session
            ([lines[0], lines[1], lines[4], lines[2]], 4),  # seq 3 then seq 1
            ([lines[0], lines[1].replace('"id":"a"', '"id":"a/b"')], 2),
        ):
            answer = await other.client.post("/v1/import", content=_import_body(bad))
            assert answer.status_code == 400, bad
            assert answer.json()["detail"].startswith(f"line {number}:"), answer.json()
        assert (await other.client.get("/v1/sessions/b")).status_code == 404


async def test_the_import_has_its_own_body_limit(tmp_path: Path) -> None:
    settings = make_settings("sqlite", tmp_path, max_body_bytes=1000, max_import_bytes=100_000)
    async with running_app(settings) as app:
        body = {"id": "s", "metadata": {"pad": "x" * 500}}
        assert (await app.client.post("/v1/sessions", json=body)).status_code == 201
        batch = {"messages": [{"role": "user", "content": "y" * 600} for _ in range(1)]}
        for _ in range(10):
            assert (await app.client.post("/v1/sessions/s/messages/batch", json=batch)).status_code == 201
        lines = await _export(app.client)
        assert len(_import_body(lines)) > 5000  # far over the request limit, under the import's
        assert (await app.client.post("/v1/sessions", content=_import_body(lines))).status_code == 413
        replaced = await app.client.post("/v1/import", params={"on_conflict": "replace"}, content=_import_body(lines))
        assert replaced.status_code == 200, replaced.text
        assert replaced.json()["messages"] == 10
        too_big = await app.client.post("/v1/import", content=b"\n" * 100_001)
        assert too_big.status_code == 413
