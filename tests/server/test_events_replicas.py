"""Two real server processes on one PostgreSQL schema: both feeds carry both replicas' changes, same ids and order."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

from tests.conftest import postgres_dsn
from tests.server.proc import RunningServer, free_port, running_server, server_env
from tests.server.sse import WireEvent, take, wire_events

pytestmark = pytest.mark.asyncio
WAIT = 10.0


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningServer, RunningServer]]:
    dsn = postgres_dsn()
    schema = f"test_{uuid.uuid4().hex[:12]}"
    env = server_env(
        CHATSESSIONS_STORE="postgres",
        CHATSESSIONS_POSTGRES_DSN=dsn,
        CHATSESSIONS_POSTGRES_SCHEMA=schema,
        CHATSESSIONS_DATA_DIR=tmp_path_factory.mktemp("replicas"),
    )
    try:
        with running_server(env, free_port()) as a, running_server(env, free_port()) as b:
            yield a, b
    finally:

        async def drop() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


async def within(events: AsyncIterator[WireEvent], count: int) -> list[WireEvent]:
    return await asyncio.wait_for(take(events, count), WAIT)


async def test_each_replica_streams_what_the_other_committed_with_the_same_ids_in_order(
    replicas: tuple[RunningServer, RunningServer],
) -> None:
    a, b = replicas
    async with (
        httpx.AsyncClient(base_url=a.base_url, timeout=WAIT) as on_a,
        httpx.AsyncClient(base_url=b.base_url, timeout=WAIT) as on_b,
        on_a.stream("GET", "/v1/events") as feed_a,
        on_b.stream("GET", "/v1/events") as feed_b,
    ):
        events_a, events_b = wire_events(feed_a), wire_events(feed_b)
        sessions = []
        for i in range(6):
            writer = on_a if i % 2 == 0 else on_b
            created = await writer.post("/v1/sessions", json={})
            assert created.status_code == 201
            sessions.append(created.json()["id"])
            other = on_b if writer is on_a else on_a
            appended = await other.post(f"/v1/sessions/{sessions[-1]}/messages", json={"role": "user", "content": "x"})
            assert appended.status_code == 201
        got_a, got_b = await within(events_a, 12), await within(events_b, 12)
    assert [(e.id, e.event, e.data) for e in got_a] == [(e.id, e.event, e.data) for e in got_b]
    assert [e.json()["session_id"] for e in got_a] == [sid for sid in sessions for _ in range(2)]
    assert [e.event for e in got_a] == ["session.created", "messages.created"] * 6


async def test_a_session_feed_on_one_replica_resumes_and_follows_writes_on_the_other(
    replicas: tuple[RunningServer, RunningServer],
) -> None:
    a, b = replicas
    async with (
        httpx.AsyncClient(base_url=a.base_url, timeout=WAIT) as on_a,
        httpx.AsyncClient(base_url=b.base_url, timeout=WAIT) as on_b,
    ):
        sid = (await on_b.post("/v1/sessions", json={})).json()["id"]
        await on_b.post(f"/v1/sessions/{sid}/messages", json={"role": "user", "content": "before"})
        async with on_a.stream("GET", f"/v1/sessions/{sid}/events", headers={"Last-Event-ID": "1"}) as feed:
            events = wire_events(feed)
            (replayed,) = await within(events, 1)
            await on_b.post(f"/v1/sessions/{sid}/messages", json={"role": "user", "content": "after"})
            assert (await on_b.delete(f"/v1/sessions/{sid}")).status_code == 204
            rest = [e async for e in events if e.comment is None]
    assert (replayed.id, replayed.json()["items"][0]["content"]) == ("2", "before")
    assert [(e.id, e.event) for e in rest] == [("3", "messages.created"), ("4", "session.deleted")]
