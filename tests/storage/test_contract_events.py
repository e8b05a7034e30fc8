"""The events contract: every change records its event with it, and only a committed change publishes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from chatsessions import events as ev
from chatsessions.errors import PreconditionFailed, SessionNotFound
from chatsessions.main import build_repository
from chatsessions.models import MessageCreate, Precondition, Role, SessionCreate, SessionPatch
from chatsessions.storage.base import SessionRepository
from tests.conftest import BACKENDS, drop_postgres_schema, make_settings

pytestmark = pytest.mark.asyncio
T = "tenant-a"


@dataclass
class Recorder:
    published: list[ev.ChangeEvent] = field(default_factory=list)

    def publish(self, events: list[ev.ChangeEvent]) -> None:
        self.published.extend(events)


@dataclass
class Store:
    repository: SessionRepository
    sink: Recorder


@pytest_asyncio.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    settings = make_settings(request.param, tmp_path)
    sink = Recorder()
    repository = await build_repository(settings, sink=sink)
    try:
        yield Store(repository, sink)
    finally:
        await repository.aclose()
        await drop_postgres_schema(settings)


def user(text: str) -> MessageCreate:
    return MessageCreate(role=Role.user, content=text)


async def published(store: Store, count: int) -> list[ev.ChangeEvent]:
    """What the sink got once it got `count` events (PostgreSQL publishes from its follower, a moment later)."""
    for _ in range(1000):
        if len(store.sink.published) >= count:
            break
        await asyncio.sleep(0.01)
    return store.sink.published


async def replay(store: Store, session_id: str, after: int = 0) -> ev.SessionReplay:
    return await store.repository.read_session_events(T, session_id, after=after, limit=100)


async def test_every_change_records_one_event_with_its_version(store: Store) -> None:
    repo = store.repository
    session = await repo.create_session(T, SessionCreate(id="s1", user_id="u1"))
    await repo.append_messages(T, "s1", [user("a")])
    await repo.append_messages(T, "s1", [user("b"), user("c")])
    await repo.patch_session(T, "s1", SessionPatch(title="t"))
    found = await replay(store, "s1")
    assert found.replayable
    assert [(e.version, e.type) for e in found.events] == [
        (1, ev.SESSION_CREATED),
        (2, ev.MESSAGES_CREATED),
        (3, ev.MESSAGES_CREATED),
        (4, ev.SESSION_UPDATED),
    ]
    assert [m["content"] for m in json.loads(found.events[2].data)["items"]] == ["b", "c"]
    assert json.loads(found.events[0].data)["session"]["id"] == session.id
    assert [e.id for e in await published(store, 4)] == [e.id for e in found.events]
    ids = [e.id for e in found.events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_a_refused_change_records_and_publishes_nothing(store: Store) -> None:
    repo = store.repository
    await repo.create_session(T, SessionCreate(id="s1"))
    with pytest.raises(PreconditionFailed):
        await repo.append_messages(T, "s1", [user("a")], if_match=Precondition(versions=frozenset({9})))
    with pytest.raises(SessionNotFound):
        await repo.append_messages(T, "nope", [user("a")])
    assert [e.type for e in (await replay(store, "s1")).events] == [ev.SESSION_CREATED]
    await store.repository.create_session(T, SessionCreate(id="s2"))  # a marker: everything before it is out
    assert [e.type for e in await published(store, 2)] == [ev.SESSION_CREATED, ev.SESSION_CREATED]


async def test_get_or_create_records_the_creation_once(store: Store) -> None:
    repo = store.repository
    for _ in range(3):
        await repo.get_or_create_session(T, "s1", SessionCreate())
    assert [e.type for e in (await replay(store, "s1")).events] == [ev.SESSION_CREATED]


async def test_positions_that_cannot_be_replayed(store: Store) -> None:
    repo = store.repository
    await repo.create_session(T, SessionCreate(id="s1"))
    await repo.append_messages(T, "s1", [user("secret")])
    assert (await replay(store, "s1", after=2)).replayable  # the current version: nothing to replay
    assert not (await replay(store, "s1", after=3)).replayable  # beyond it
    await repo.clear_messages(T, "s1")
    cleared = await replay(store, "s1", after=0)
    assert not cleared.replayable  # the clear erased what came before it
    after_clear = await replay(store, "s1", after=2)
    assert after_clear.replayable
    assert [e.type for e in after_clear.events] == [ev.SESSION_CLEARED]
    assert "secret" not in after_clear.events[0].data
    missing = await replay(store, "nope")
    assert missing.session is None


async def test_deletion_erases_the_history_and_records_its_event(store: Store) -> None:
    repo = store.repository
    await repo.create_session(T, SessionCreate(id="s0"))  # an older event, kept: the position stays replayable
    await repo.create_session(T, SessionCreate(id="s1"))
    await repo.append_messages(T, "s1", [user("secret")])
    await repo.delete_session(T, "s1")
    tenant = await repo.read_tenant_events(T, after=1, filters=ev.TenantFilter(), limit=100)
    assert tenant.replayable
    assert [(e.type, e.version) for e in tenant.events] == [(ev.SESSION_DELETED, 3)]
    assert (await published(store, 4))[-1].type == ev.SESSION_DELETED
    await repo.create_session(T, SessionCreate(id="s1"))
    again = await replay(store, "s1")
    assert [e.type for e in again.events] == [ev.SESSION_CREATED]


async def test_the_tenant_feed_is_in_id_order_filtered_and_scoped(store: Store) -> None:
    repo = store.repository
    start = await repo.read_tenant_events(T, after=None, filters=ev.TenantFilter(), limit=0)
    await repo.create_session(T, SessionCreate(id="a", user_id="u1"))
    await repo.create_session(T, SessionCreate(id="b", user_id="u2"))
    await repo.create_session("other", SessionCreate(id="c", user_id="u1"))
    await repo.append_messages(T, "a", [user("x")])
    every = await repo.read_tenant_events(T, after=start.head, filters=ev.TenantFilter(), limit=100)
    assert [e.session_id for e in every.events] == ["a", "b", "a"]
    mine = await repo.read_tenant_events(T, after=start.head, filters=ev.TenantFilter(user_id="u1"), limit=100)
    assert [(e.session_id, e.type) for e in mine.events] == [("a", ev.SESSION_CREATED), ("a", ev.MESSAGES_CREATED)]
    head = (await repo.read_tenant_events(T, after=None, filters=ev.TenantFilter(), limit=0)).head
    assert not (await repo.read_tenant_events(T, after=head + 1, filters=ev.TenantFilter(), limit=1)).replayable
    assert not (await repo.read_tenant_events(T, after=-1, filters=ev.TenantFilter(), limit=1)).replayable


async def test_events_older_than_the_retention_are_pruned(tmp_path: Path) -> None:
    from chatsessions.storage.sqlite import SqliteSessionRepository

    settings = make_settings("sqlite", tmp_path, events_retention_seconds=1e-6)
    repo = await SqliteSessionRepository.open(settings)
    try:
        await repo.create_session(T, SessionCreate(id="s1"))
        await repo.append_messages(T, "s1", [user("a")])
        assert await repo.prune_events() == 2
        assert not (await repo.read_session_events(T, "s1", after=0, limit=10)).replayable
        assert (await repo.read_session_events(T, "s1", after=2, limit=10)).replayable
        tenant = await repo.read_tenant_events(T, after=0, filters=ev.TenantFilter(), limit=10)
        assert not tenant.replayable  # pruned past position 0
        assert tenant.head == 2
    finally:
        await repo.aclose()


async def test_a_message_deletion_records_its_event(store: Store) -> None:
    repo = store.repository
    await repo.create_session(T, SessionCreate(id="s1"))
    await repo.append_messages(T, "s1", [user("a"), user("b")])
    session = await repo.delete_message(T, "s1", 1)
    found = await replay(store, "s1", after=2)
    assert found.replayable
    assert [(e.type, e.version, json.loads(e.data)["seq"]) for e in found.events] == [
        (ev.MESSAGE_DELETED, session.version, 1)
    ]
