"""The change feeds over real HTTP: a uvicorn process, httpx streaming, the wire format as clients see it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.security.support import Tenants, make_tenants
from tests.server.proc import RunningServer, free_port, running_server, server_env
from tests.server.sse import WireEvent, take, wire_events

pytestmark = pytest.mark.asyncio

BUFFER = 8
HEARTBEAT = 0.3
WAIT = 10.0  # seconds any single expected event may take before the test fails


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> Tenants:
    return make_tenants(tmp_path_factory.mktemp("events-keys"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tenants: Tenants) -> Iterator[RunningServer]:
    env = server_env(
        CHATSESSIONS_STORE="sqlite",
        CHATSESSIONS_DATA_DIR=tmp_path_factory.mktemp("events-data"),
        CHATSESSIONS_KEYS_FILE=tenants.keys_file,
        CHATSESSIONS_EVENTS_BUFFER=str(BUFFER),
        CHATSESSIONS_EVENTS_HEARTBEAT_SECONDS=str(HEARTBEAT),
    )
    with running_server(env, free_port()) as running:
        yield running


@pytest_asyncio.fixture
async def alice(server: RunningServer, tenants: Tenants) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, headers=tenants.alice, timeout=WAIT) as client:
        yield client


async def new_session(client: httpx.AsyncClient, **fields: str) -> str:
    response = await client.post("/v1/sessions", json=fields)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["id"]
    return session_id


async def append(client: httpx.AsyncClient, session_id: str, text: str) -> int:
    response = await client.post(f"/v1/sessions/{session_id}/messages", json={"role": "user", "content": text})
    assert response.status_code == 201, response.text
    return int(response.headers["ETag"].strip('"'))


@asynccontextmanager
async def feed(
    client: httpx.AsyncClient, path: str, **headers: str
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[WireEvent]]]:
    """An open stream (its 200 headers received) and its events."""
    async with client.stream("GET", path, headers=headers) as response:
        yield response, wire_events(response)


async def within(events: AsyncIterator[WireEvent], count: int, *, comments: bool = False) -> list[WireEvent]:
    return await asyncio.wait_for(take(events, count, comments=comments), WAIT)


async def test_a_change_after_the_headers_is_delivered_with_its_version(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)
    async with feed(alice, f"/v1/sessions/{sid}/events") as (response, events):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        versions = [await append(alice, sid, f"m{i}") for i in range(3)]
        got = await within(events, 3)
    assert [e.event for e in got] == ["messages.created"] * 3
    assert [int(e.id or 0) for e in got] == versions
    first = got[0].json()
    assert first["session_id"] == sid
    assert first["version"] == versions[0]
    assert [m["content"] for m in first["items"]] == ["m0"]


async def test_resume_replays_every_later_event_once_in_order_then_goes_live(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)  # version 1: session.created
    for i in range(5):
        await append(alice, sid, f"m{i}")  # versions 2..6
    patched = await alice.patch(f"/v1/sessions/{sid}", json={"title": "t"})  # 7: session.updated
    assert patched.status_code == 200
    async with feed(alice, f"/v1/sessions/{sid}/events", **{"Last-Event-ID": "3"}) as (_, events):
        replayed = await within(events, 4)
        live_version = await append(alice, sid, "live")
        (live,) = await within(events, 1)
    assert [int(e.id or 0) for e in replayed] == [4, 5, 6, 7]
    assert [e.event for e in replayed] == ["messages.created"] * 3 + ["session.updated"]
    assert replayed[-1].json()["session"]["title"] == "t"
    assert int(live.id or 0) == live_version == 8


async def test_the_header_wins_over_after_and_zero_replays_from_the_creation(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)
    await append(alice, sid, "a")
    async with feed(alice, f"/v1/sessions/{sid}/events?after=1", **{"Last-Event-ID": "0"}) as (_, events):
        got = await within(events, 2)
    assert [(e.id, e.event) for e in got] == [("1", "session.created"), ("2", "messages.created")]
    async with feed(alice, f"/v1/sessions/{sid}/events?after=1") as (_, events):
        (only,) = await within(events, 1)
    assert (only.id, only.event) == ("2", "messages.created")


async def test_a_position_beyond_the_version_gets_reset_with_the_current_session(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)
    await append(alice, sid, "a")
    async with feed(alice, f"/v1/sessions/{sid}/events", **{"Last-Event-ID": "99"}) as (_, events):
        (reset,) = await within(events, 1)
        await append(alice, sid, "b")
        (after,) = await within(events, 1)
    assert (reset.event, reset.id) == ("reset", "2")
    assert reset.json()["session"]["version"] == 2
    assert (after.event, after.id) == ("messages.created", "3")


async def test_a_cleared_history_cannot_be_replayed_before_the_clear(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)
    await append(alice, sid, "secret")
    assert (await alice.delete(f"/v1/sessions/{sid}/messages")).status_code in (200, 204)
    async with feed(alice, f"/v1/sessions/{sid}/events", **{"Last-Event-ID": "1"}) as (_, events):
        (reset,) = await within(events, 1)
    assert (reset.event, reset.id) == ("reset", "3")
    async with feed(alice, f"/v1/sessions/{sid}/events", **{"Last-Event-ID": "2"}) as (_, events):
        (cleared,) = await within(events, 1)
    assert (cleared.event, cleared.id) == ("session.cleared", "3")
    assert "secret" not in (cleared.data or "")


async def test_heartbeats_are_comment_lines(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)
    async with feed(alice, f"/v1/sessions/{sid}/events") as (_, events):
        beats = await within(events, 2, comments=True)
    assert all(e.comment is not None and e.event is None for e in beats)


async def test_deletion_is_the_last_event_of_the_stream(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)
    async with feed(alice, f"/v1/sessions/{sid}/events") as (_, events):
        await append(alice, sid, "a")
        assert (await alice.delete(f"/v1/sessions/{sid}")).status_code == 204
        rest = [e async for e in events if e.comment is None]  # ends by itself
    assert [(e.event, e.id) for e in rest] == [("messages.created", "2"), ("session.deleted", "3")]
    assert rest[-1].json() == {"session_id": sid, "version": 3}


async def test_a_recreated_session_does_not_replay_its_predecessor(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)
    await append(alice, sid, "old")
    assert (await alice.delete(f"/v1/sessions/{sid}")).status_code == 204
    assert (await alice.post("/v1/sessions", json={"id": sid})).status_code == 201
    async with feed(alice, f"/v1/sessions/{sid}/events", **{"Last-Event-ID": "0"}) as (_, events):
        (created,) = await within(events, 1)
        await append(alice, sid, "new")
        (appended,) = await within(events, 1)
    assert (created.event, created.id) == ("session.created", "1")
    assert appended.json()["items"][0]["content"] == "new"


async def test_a_missing_or_foreign_session_is_404_before_any_stream(
    server: RunningServer, tenants: Tenants, alice: httpx.AsyncClient
) -> None:
    sid = await new_session(alice)
    async with httpx.AsyncClient(base_url=server.base_url, headers=tenants.bob, timeout=WAIT) as bob:
        foreign = await bob.get(f"/v1/sessions/{sid}/events")
        missing = await bob.get("/v1/sessions/nope/events")
    for response in (foreign, missing):
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"].endswith("/session-not-found")


async def test_a_position_that_is_not_a_version_is_400(alice: httpx.AsyncClient) -> None:
    sid = await new_session(alice)
    response = await alice.get(f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": "abc"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/problem+json"


async def test_a_subscriber_that_reads_nothing_is_cut_off_and_resumes_without_gaps(
    alice: httpx.AsyncClient,
) -> None:
    sid = await new_session(alice)
    big = "x" * 60_000  # enough bytes that the sockets' buffers fill long before the appends end
    count = 300
    async with feed(alice, f"/v1/sessions/{sid}/events", **{"Last-Event-ID": "1"}) as (_, events):
        # Nothing is read while the appends run: the server's buffer for this stream overflows.
        async with httpx.AsyncClient(base_url=str(alice.base_url), headers=dict(alice.headers), timeout=WAIT) as w:
            for i in range(count):
                await append(w, sid, f"{i}:{big}")
        received = [e async for e in events if e.comment is None]  # the server ended the stream
    versions = [int(e.id or 0) for e in received]
    assert versions == list(range(2, 2 + len(versions)))
    assert len(versions) < count  # it was cut off before the end
    async with feed(alice, f"/v1/sessions/{sid}/events", **{"Last-Event-ID": str(versions[-1])}) as (_, events):
        rest = await within(events, count + 1 - versions[-1])
    assert [int(e.id or 0) for e in rest] == list(range(versions[-1] + 1, count + 2))


async def test_the_tenant_feed_filters_and_resumes_by_opaque_cursor(alice: httpx.AsyncClient) -> None:
    user = f"u-{free_port()}"
    async with feed(alice, f"/v1/events?user_id={user}") as (_, events):
        mine = await new_session(alice, user_id=user)
        await new_session(alice, user_id="someone-else")
        await append(alice, mine, "a")
        await append(alice, mine, "b")
        got = await within(events, 3)
    assert [(e.event, e.json()["session_id"]) for e in got] == [
        ("session.created", mine),
        ("messages.created", mine),
        ("messages.created", mine),
    ]
    assert all(e.id and not e.id.isdigit() for e in got)
    async with feed(alice, f"/v1/events?user_id={user}", **{"Last-Event-ID": got[0].id or ""}) as (_, events):
        replayed = await within(events, 2)
    assert [e.id for e in replayed] == [e.id for e in got[1:]]
    async with feed(alice, "/v1/events", **{"Last-Event-ID": "not-a-cursor"}) as (_, events):
        (reset,) = await within(events, 1)
    assert reset.event == "reset"
    assert reset.json() == {}


async def test_the_tenant_feed_holds_only_the_tenant_s_own_events(
    server: RunningServer, tenants: Tenants, alice: httpx.AsyncClient
) -> None:
    async with (
        httpx.AsyncClient(base_url=server.base_url, headers=tenants.bob, timeout=WAIT) as bob,
        feed(bob, "/v1/events") as (_, events),
    ):
        await new_session(alice)
        bobs = await new_session(bob)
        (got,) = await within(events, 1)
    assert got.json()["session_id"] == bobs


async def test_past_the_most_streams_the_answer_is_503_with_retry_after(tmp_path: Path) -> None:
    env = server_env(
        CHATSESSIONS_STORE="memory", CHATSESSIONS_DATA_DIR=tmp_path, CHATSESSIONS_EVENTS_MAX_SUBSCRIBERS="1"
    )
    with running_server(env, free_port()) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=WAIT) as client:
            async with feed(client, "/v1/events") as (first, _):
                assert first.status_code == 200
                refused = await client.get("/v1/events")
            assert refused.status_code == 503
            assert refused.headers["Retry-After"]
            # The slot is free again once the first stream closed.
            for _ in range(100):
                async with feed(client, "/v1/events") as (again, _):
                    if again.status_code == 200:
                        break
                await asyncio.sleep(0.05)
            assert again.status_code == 200
