"""Tenant isolation: another tenant's session looks exactly like a missing one, and stays untouched.

Every route that takes a session id is called with bob's key on alice's session
`shared01` and on `absent01`, an id nobody has (same length, so the same
Content-Length): the two answers must agree in status, headers (bar `date` and `x-request-id`) and
body (bar the id itself), and alice's view of her data must not move.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests.security.support import STORES, RunningApp, Tenants, make_tenants, running_app, store_settings

pytestmark = pytest.mark.asyncio

SHARED = "shared01"
ABSENT = "absent01"
MESSAGE = {"role": "user", "content": "hello"}


@dataclass(frozen=True, slots=True)
class World:
    app: RunningApp
    tenants: Tenants
    alice_version: int


@pytest_asyncio.fixture(params=STORES)
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    tenants = make_tenants(tmp_path / "keys")
    settings = store_settings(request.param, tmp_path, keys_file=tenants.keys_file)
    async with running_app(settings) as app:
        client, alice = app.client, tenants.alice
        create = {"id": SHARED, "user_id": "u-alice", "title": "secret", "metadata": {"tenant": "bob"}}
        assert (await client.post("/v1/sessions", json=create, headers=alice)).status_code == 201
        for _ in range(2):
            response = await client.post(f"/v1/sessions/{SHARED}/messages", json=MESSAGE, headers=alice)
            assert response.status_code == 201
        session = (await client.get(f"/v1/sessions/{SHARED}", headers=alice)).json()
        yield World(app, tenants, session["version"])


async def alice_view(world: World) -> list[Any]:
    client, alice = world.app.client, world.tenants.alice
    return [
        (await client.get(f"/v1/sessions/{SHARED}", headers=alice)).json(),
        (await client.get(f"/v1/sessions/{SHARED}/messages", headers=alice)).json(),
        (await client.get("/v1/sessions", headers=alice)).json(),
    ]


# (method, path under the session, JSON body, extra headers); `{v}` is alice's current version.
CALLS: list[tuple[str, str, Any, dict[str, str]]] = [
    ("GET", "", None, {}),
    ("PATCH", "", {"title": "pwned"}, {}),
    ("PATCH", "", {"title": "pwned"}, {"If-Match": '"{v}"'}),
    ("PATCH", "", {"title": "pwned"}, {"If-Match": '"999"'}),
    ("PATCH", "", {"title": "pwned"}, {"If-Match": "*"}),
    ("DELETE", "", None, {}),
    ("DELETE", "", None, {"If-Match": '"{v}"'}),
    ("DELETE", "", None, {"If-Match": '"999"'}),
    ("POST", "/messages", MESSAGE, {}),
    ("POST", "/messages", MESSAGE, {"If-Match": '"{v}"'}),
    ("POST", "/messages", MESSAGE, {"If-Match": '"999"'}),
    ("POST", "/messages", MESSAGE, {"Idempotency-Key": "alice-key-1"}),
    ("POST", "/messages/batch", {"messages": [MESSAGE, MESSAGE]}, {}),
    ("POST", "/messages/batch", {"messages": [MESSAGE]}, {"If-Match": '"999"', "Idempotency-Key": "k2"}),
    ("GET", "/messages", None, {}),
    ("GET", "/messages?order=desc&limit=1", None, {}),
    ("GET", "/messages?after=1", None, {}),
    ("GET", "/messages/1", None, {}),
    ("GET", "/messages/2", None, {}),
    ("GET", "/messages/999", None, {}),
    ("DELETE", "/messages", None, {}),
    ("DELETE", "/messages", None, {"If-Match": '"{v}"'}),
    ("DELETE", "/messages", None, {"If-Match": '"999"'}),
    # PUT with a body id other than the path: a 422 that must not depend on the id existing.
    ("PUT", "", {"id": "zzzzzzzz"}, {}),
]


def comparable(response: httpx.Response, session_id: str) -> tuple[int, dict[str, str], bytes]:
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "x-request-id")}
    return response.status_code, headers, response.content.replace(session_id.encode(), b"<id>")


async def test_another_tenants_session_answers_as_missing(world: World) -> None:
    client, alice, bob = world.app.client, world.tenants.alice, world.tenants.bob
    # Alice used this Idempotency-Key on her own session first: bob must not get her answer.
    sent = await client.post(
        f"/v1/sessions/{SHARED}/messages", json=MESSAGE, headers={**alice, "Idempotency-Key": "alice-key-1"}
    )
    assert sent.status_code == 201
    before = await alice_view(world)
    version = str(before[0]["version"])
    for method, suffix, body, headers in CALLS:
        call = (method, suffix, headers)
        extra = {k: v.replace("{v}", version) for k, v in headers.items()}
        answers = []
        for session_id in (SHARED, ABSENT):
            if session_id == ABSENT and "Idempotency-Key" in extra:
                # A key bob has not used yet, as the first call's key was new to him.
                extra["Idempotency-Key"] = extra["Idempotency-Key"][::-1]
            response = await client.request(
                method, f"/v1/sessions/{session_id}{suffix}", json=body, headers={**bob, **extra}
            )
            answers.append(comparable(response, session_id))
        assert answers[0] == answers[1], call
        assert answers[0][0] in (404, 422), (call, answers[0])
        assert "idempotent-replayed" not in answers[0][1], call
        assert await alice_view(world) == before, call


async def test_put_and_post_create_the_callers_own_session(world: World) -> None:
    client, bob = world.app.client, world.tenants.bob
    before = await alice_view(world)

    put = await client.put(f"/v1/sessions/{SHARED}", json={"title": "bob's"}, headers=bob)
    assert put.status_code == 201  # created, exactly as for a missing id: no 200 with alice's data
    assert put.json()["title"] == "bob's"
    assert put.json()["version"] == 1
    assert put.json()["message_count"] == 0

    # The same id is now bob's too: a second POST conflicts for bob only, a first one does not for carol.
    posted = await client.post("/v1/sessions", json={"id": SHARED}, headers=bob)
    assert posted.status_code == 409
    absent = await client.post("/v1/sessions", json={"id": ABSENT}, headers=bob)
    assert absent.status_code == 201

    assert await alice_view(world) == before
    bob_list = (await client.get("/v1/sessions", headers=bob)).json()
    assert sorted(s["id"] for s in bob_list["items"]) == [ABSENT, SHARED]
    assert all(s["title"] != "secret" for s in bob_list["items"])


async def test_post_with_another_tenants_id_does_not_conflict(world: World) -> None:
    client, bob = world.app.client, world.tenants.bob
    response = await client.post("/v1/sessions", json={"id": SHARED, "title": "mine"}, headers=bob)
    assert response.status_code == 201
    assert response.json()["version"] == 1
    assert response.json()["title"] == "mine"


async def test_listing_and_filters_show_only_the_callers_sessions(world: World) -> None:
    client, bob = world.app.client, world.tenants.bob
    for query in ("", "?user_id=u-alice", "?limit=100", "?tenant=alice", "?user_id=u-alice&tenant=alice"):
        response = await client.get(f"/v1/sessions{query}", headers=bob)
        assert response.status_code == 200, query
        assert response.json() == {"items": [], "next_cursor": None}, query
    # Headers that look like a tenant selector are ignored.
    response = await client.get("/v1/sessions", headers={**bob, "X-Tenant": "alice", "X-Tenant-Id": "alice"})
    assert response.json()["items"] == []


async def test_metadata_naming_a_tenant_grants_nothing(world: World) -> None:
    """Alice's session carries metadata {"tenant": "bob"}: bob still cannot see it."""
    client, bob = world.app.client, world.tenants.bob
    assert (await client.get(f"/v1/sessions/{SHARED}", headers=bob)).status_code == 404


async def test_idempotency_keys_are_scoped_per_tenant(world: World) -> None:
    client, alice, bob = world.app.client, world.tenants.alice, world.tenants.bob
    assert (await client.put(f"/v1/sessions/{SHARED}", headers=bob)).status_code == 201
    key = {"Idempotency-Key": "same-key"}
    path = f"/v1/sessions/{SHARED}/messages"

    first = await client.post(path, json=MESSAGE, headers={**alice, **key})
    assert first.status_code == 201
    # Same key, same path, same body, other tenant: a fresh append, not alice's answer.
    other = await client.post(path, json=MESSAGE, headers={**bob, **key})
    assert other.status_code == 201
    assert "idempotent-replayed" not in other.headers
    # Same key, other body, other tenant: no 422 "key reused" leaking that alice used it.
    different = await client.post(
        f"{path}/batch", json={"messages": [MESSAGE]}, headers={**bob, "Idempotency-Key": "k"}
    )
    assert different.status_code == 201
    reused = await client.post(
        path, json={"role": "user", "content": "else"}, headers={**alice, "Idempotency-Key": "k"}
    )
    assert reused.status_code == 201
    # Each tenant's retry replays its own first answer.
    again = await client.post(path, json=MESSAGE, headers={**alice, **key})
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    again_bob = await client.post(path, json=MESSAGE, headers={**bob, **key})
    assert again_bob.json() == other.json()

    alice_session = (await client.get(f"/v1/sessions/{SHARED}", headers=alice)).json()
    bob_session = (await client.get(f"/v1/sessions/{SHARED}", headers=bob)).json()
    assert alice_session["message_count"] == 4  # two from the fixture, `first`, `reused`
    assert bob_session["message_count"] == 2  # `other`, `different`

    # POST /v1/sessions with one key in two tenants: two sessions, no replay across.
    created = [
        await client.post("/v1/sessions", json={"title": "t"}, headers={**headers, "Idempotency-Key": "create-1"})
        for headers in (alice, bob)
    ]
    assert [r.status_code for r in created] == [201, 201]
    assert created[0].json()["id"] != created[1].json()["id"]
    assert (await client.get(f"/v1/sessions/{created[0].json()['id']}", headers=bob)).status_code == 404
