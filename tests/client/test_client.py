"""`AsyncChatSessions` against the real app (ASGI transport, real lifespan, SQLite store): every operation."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager

from chatsessions.client import (
    AsyncChatSessions,
    Conflict,
    NotFound,
    PreconditionFailed,
    Unauthorized,
    ValidationFailed,
)
from chatsessions.config import Settings
from chatsessions.keys import create_key
from chatsessions.main import create_app
from chatsessions.models import MessageCreate, Role, Session, SessionCreate
from tests.conftest import make_settings
from tests.storage.test_contract_shape import CONVERSATION, FIELDS

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def chats(settings: Settings) -> AsyncIterator[AsyncChatSessions]:
    app = create_app(settings)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://test") as http,
        AsyncChatSessions(http=http) as client,
    ):
        yield client


async def test_sessions_crud(chats: AsyncChatSessions) -> None:
    created = await chats.create_session(id="s1", user_id="u1", title="Support", settings={"model": "m"})
    assert isinstance(created, Session)
    assert (created.id, created.user_id, created.settings.model, created.version) == ("s1", "u1", "m", 1)
    assert await chats.get_session("s1") == created
    assert await chats.get_session("nope") is None
    again, was_created = await chats.put_session("s1", title="ignored")
    assert (again, was_created) == (created, False)
    made, was_created = await chats.put_session("s2", SessionCreate(user_id="u2"))
    assert (made.user_id, was_created) == ("u2", True)
    patched = await chats.patch_session("s1", title=None, metadata={"k": 1}, if_match=created)
    assert (patched.title, patched.metadata, patched.version) == (None, {"k": 1}, 2)
    await chats.delete_session("s2", if_match=made.etag)
    assert await chats.get_session("s2") is None
    with pytest.raises(NotFound):
        await chats.delete_session("s2")


async def test_a_session_without_id_gets_one(chats: AsyncChatSessions) -> None:
    first = await chats.create_session()
    second = await chats.create_session(SessionCreate(title="t"))
    assert first.id != second.id
    assert second.title == "t"


async def test_append_and_page_through_messages(chats: AsyncChatSessions) -> None:
    session = await chats.create_session(id="s")
    one = await chats.append_message("s", role="user", content="hello", if_match=session)
    assert (one.seq, one.role, one.content) == (1, Role.user, "hello")
    await chats.append_message("s", MessageCreate(role=Role.assistant, content="hi"))
    batch = await chats.append_messages("s", [{"role": "user", "content": f"m{i}"} for i in range(3, 26)])
    assert [m.seq for m in batch] == list(range(3, 26))
    seqs = [m.seq async for m in chats.iter_messages("s", page_size=7)]
    assert seqs == list(range(1, 26))
    backwards = [m.seq async for m in chats.iter_messages("s", order="desc", page_size=4, after=10)]
    assert backwards == list(range(25, 10, -1))
    page = await chats.list_messages("s", after=5, limit=2)
    assert ([m.seq for m in page.items], page.has_more) == ([6, 7], True)
    assert (await chats.get_message("s", 3)) == batch[0]
    assert await chats.get_message("s", 99) is None
    with pytest.raises(NotFound):
        await chats.get_message("nope", 1)
    await chats.clear_messages("s")
    assert [m async for m in chats.iter_messages("s")] == []
    session_after = await chats.get_session("s")
    assert session_after is not None
    assert session_after.last_seq == 25


async def test_an_openai_conversation_round_trips(chats: AsyncChatSessions) -> None:
    await chats.create_session(id="s")
    await chats.append_messages("s", CONVERSATION)
    got = [m.model_dump(mode="json") async for m in chats.iter_messages("s")]
    assert [{f: m[f] for f in FIELDS} for m in got] == [{f: m.get(f) for f in FIELDS} for m in CONVERSATION]


async def test_sessions_page_through_with_filters(chats: AsyncChatSessions) -> None:
    for i in range(12):
        await chats.create_session(id=f"s{i}", user_id="u" if i % 2 else "v")
    ids = [s.id async for s in chats.iter_sessions(user_id="u", page_size=4)]
    assert sorted(ids) == sorted(f"s{i}" for i in range(1, 12, 2))
    page = await chats.list_sessions(limit=5)
    assert len(page.items) == 5
    assert page.next_cursor is not None


async def test_search_and_citations(chats: AsyncChatSessions) -> None:
    await chats.create_session(id="s", user_id="u")
    await chats.append_messages(
        "s",
        [
            {"role": "user", "content": "where is the zebra"},
            {"role": "assistant", "content": "zebra in section 2", "references": [{"doc_id": "d1", "page": 2}]},
        ],
    )
    hits = [hit.seq async for hit in chats.iter_search("zebra", page_size=1)]
    assert sorted(hits) == [1, 2]
    assert [hit.seq for hit in (await chats.search_messages("zebra", role="assistant")).items] == [2]
    citations = await chats.list_citations("d1")
    assert [(c.seq, c.reference) for c in citations.items] == [(2, {"doc_id": "d1", "page": 2})]
    assert [s.id async for s in chats.iter_sessions(cited_doc_id="d1")] == ["s"]


async def test_conflicts(chats: AsyncChatSessions) -> None:
    await chats.create_session(id="s")
    with pytest.raises(Conflict) as caught:
        await chats.create_session(id="s")
    assert caught.value.kind == "session-exists"
    await chats.append_message("s", role="user", content="a", id="m1")
    with pytest.raises(Conflict) as message_exists:
        await chats.append_message("s", role="user", content="b", id="m1")
    assert message_exists.value.kind == "message-exists"
    assert message_exists.value.status == 409


async def test_a_stale_if_match_carries_the_current_etag_to_retry_with(chats: AsyncChatSessions) -> None:
    session = await chats.create_session(id="s")
    await chats.append_message("s", role="user", content="moved on")
    with pytest.raises(PreconditionFailed) as caught:
        await chats.patch_session("s", title="t", if_match=session)
    assert caught.value.etag == '"2"'
    patched = await chats.patch_session("s", title="t", if_match=caught.value.etag)
    assert patched.version == 3
    with pytest.raises(PreconditionFailed):
        await chats.append_message("s", role="user", content="x", if_match=2)
    assert (await chats.append_message("s", role="user", content="x", if_match=3)).seq == 2


async def test_validation_failures_carry_their_errors(chats: AsyncChatSessions, settings: Settings) -> None:
    await chats.create_session(id="s")
    with pytest.raises(ValidationFailed) as local:  # caught by the shared model before sending
        await chats.append_message("s", role="critic", content="x")
    assert local.value.errors[0]["loc"] == ["body", "role"]
    assert local.value.status is None
    too_big = "x" * (settings.max_content_bytes + 1)
    with pytest.raises(ValidationFailed) as remote:  # a limit only the service knows
        await chats.append_messages("s", [{"role": "user", "content": "ok"}, {"role": "user", "content": too_big}])
    assert remote.value.status == 422
    assert remote.value.errors[0]["loc"] == ["body", "messages", 1, "content"]
    assert (await chats.list_messages("s")).items == []


async def test_wrong_or_missing_key_is_unauthorized_and_a_key_works(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    key, _ = create_key(keys, tenant="alice")
    app = create_app(make_settings("sqlite", tmp_path, keys_file=keys))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(manager.app)
        for api_key in (None, "cs_wrong"):
            async with (
                httpx.AsyncClient(transport=transport, base_url="http://test") as http,
                AsyncChatSessions(http=http, api_key=api_key) as chats,
            ):
                with pytest.raises(Unauthorized):
                    await chats.create_session(id="s")
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://test") as http,
            AsyncChatSessions(http=http, api_key=key) as chats,
        ):
            assert (await chats.create_session(id="s")).id == "s"


async def test_delete_one_message(chats: AsyncChatSessions) -> None:
    session = await chats.create_session(id="s")
    await chats.append_messages("s", [{"role": "user", "content": c} for c in ("a", "b", "c")])
    with pytest.raises(PreconditionFailed):
        await chats.delete_message("s", 2, if_match=session)
    await chats.delete_message("s", 2)
    assert [m.seq async for m in chats.iter_messages("s")] == [1, 3]
    assert await chats.get_message("s", 2) is None
    with pytest.raises(NotFound):
        await chats.delete_message("s", 2)
