"""Streamed messages on every backend: deltas, the finishing PATCH, immutability, search, the idle timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from chatsessions import events as ev
from chatsessions.errors import InvalidInput, MessageNotFound, MessageNotInProgress, PreconditionFailed
from chatsessions.main import build_repository
from chatsessions.models import (
    MessageCreate,
    MessageStatus,
    Precondition,
    Role,
    SearchFilter,
    SessionCreate,
    SessionPatch,
)
from chatsessions.storage.base import SessionRepository
from chatsessions.text import SearchQuery
from tests.conftest import BACKENDS, drop_postgres_schema, make_settings

pytestmark = pytest.mark.asyncio
T = "tenant-s"
IDLE = 0.3


@pytest_asyncio.fixture(params=BACKENDS)
async def repo(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionRepository]:
    settings = make_settings(request.param, tmp_path, max_content_bytes=64, stream_idle_seconds=IDLE)
    repository = await build_repository(settings, sink=ev.NullSink())
    try:
        yield repository
    finally:
        await repository.aclose()
        await drop_postgres_schema(settings)


async def open_stream(repo: SessionRepository, session_id: str = "s1") -> int:
    await repo.create_session(T, SessionCreate(id=session_id))
    streamed = MessageCreate(role=Role.assistant, content="", status=MessageStatus.in_progress)
    _, (message,) = await repo.append_messages(T, session_id, [streamed])
    return message.seq


async def test_deltas_append_text_one_version_each_and_readable_at_once(repo: SessionRepository) -> None:
    seq = await open_stream(repo)
    assert (await repo.get_message(T, "s1", seq)).status is MessageStatus.in_progress
    versions = []
    for piece in ("Hel", "lo", " world"):
        session, message = await repo.append_delta(T, "s1", seq, piece)
        versions.append(session.version)
        assert (await repo.get_message(T, "s1", seq)).content == message.content
    assert versions == [3, 4, 5]
    stored = await repo.get_message(T, "s1", seq)
    assert stored.content == "Hello world"
    assert stored.updated_at >= stored.created_at
    replay = await repo.read_session_events(T, "s1", after=2, limit=10)
    assert [(e.type, json.loads(e.data)["content"]) for e in replay.events] == [
        (ev.MESSAGE_DELTA, "Hel"),
        (ev.MESSAGE_DELTA, "lo"),
        (ev.MESSAGE_DELTA, " world"),
    ]


async def test_finishing_makes_the_message_immutable_and_searchable(repo: SessionRepository) -> None:
    seq = await open_stream(repo)
    await repo.append_delta(T, "s1", seq, "zebra crossing")
    query = SearchQuery.parse("zebra")
    assert (await repo.search(T, query, filters=SearchFilter(), limit=10, offset=0)).items == []
    session, done = await repo.update_message(T, "s1", seq, {"status": "completed", "metadata": {"model": "m1"}})
    assert done.status is MessageStatus.completed
    assert done.metadata == {"model": "m1"}
    assert done.content == "zebra crossing"
    hits = (await repo.search(T, query, filters=SearchFilter(), limit=10, offset=0)).items
    assert [(h.session_id, h.seq) for h in hits] == [("s1", seq)]
    with pytest.raises(MessageNotInProgress):
        await repo.append_delta(T, "s1", seq, "more")
    with pytest.raises(MessageNotInProgress):
        await repo.update_message(T, "s1", seq, {"content": "rewritten"})
    assert (await repo.get_message(T, "s1", seq)).content == "zebra crossing"
    last = (await repo.read_session_events(T, "s1", after=session.version - 1, limit=10)).events
    assert [e.type for e in last] == [ev.MESSAGE_UPDATED]
    assert json.loads(last[0].data)["message"]["status"] == "completed"


async def test_bad_deltas_change_nothing(repo: SessionRepository) -> None:
    seq = await open_stream(repo)
    await repo.append_delta(T, "s1", seq, "x" * 60)
    with pytest.raises(InvalidInput):
        await repo.append_delta(T, "s1", seq, "y" * 10)  # past the 64-byte content limit
    with pytest.raises(MessageNotFound):
        await repo.append_delta(T, "s1", seq + 1, "y")
    with pytest.raises(PreconditionFailed):
        await repo.append_delta(T, "s1", seq, "y", if_match=Precondition(versions=frozenset({1})))
    _, (plain,) = await repo.append_messages(T, "s1", [MessageCreate(role=Role.user, content="hi")])
    with pytest.raises(MessageNotInProgress):
        await repo.append_delta(T, "s1", plain.seq, "y")
    assert (await repo.get_message(T, "s1", seq)).content == "x" * 60
    assert (await repo.get_session(T, "s1")) is not None
    session = await repo.get_session(T, "s1")
    assert session is not None
    assert session.version == 4  # create, append, one delta, the plain append


async def test_an_abandoned_stream_becomes_incomplete_by_itself(repo: SessionRepository) -> None:
    seq = await open_stream(repo)
    await repo.append_delta(T, "s1", seq, "partial")
    for _ in range(200):
        if (await repo.get_message(T, "s1", seq)).status is MessageStatus.incomplete:
            break
        await asyncio.sleep(0.05)
    message = await repo.get_message(T, "s1", seq)
    assert message.status is MessageStatus.incomplete
    assert message.content == "partial"
    events = (await repo.read_session_events(T, "s1", after=3, limit=10)).events
    assert [e.type for e in events] == [ev.MESSAGE_UPDATED]
    with pytest.raises(MessageNotInProgress):
        await repo.append_delta(T, "s1", seq, "late")


async def test_a_patch_that_is_not_a_stream_change_is_refused(repo: SessionRepository) -> None:
    await repo.create_session(T, SessionCreate(id="s1"))
    await repo.patch_session(T, "s1", SessionPatch(title="t"))
    _, (plain,) = await repo.append_messages(T, "s1", [MessageCreate(role=Role.user, content="hi")])
    with pytest.raises(MessageNotInProgress):
        await repo.update_message(T, "s1", plain.seq, {"status": "incomplete"})
