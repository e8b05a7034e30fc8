"""Lifecycle contract, on every backend: deleting one message, retention, erasure, import/export."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from chatsessions.errors import MessageNotFound, PreconditionFailed, SessionExists, SessionNotFound
from chatsessions.models import (
    CitationFilter,
    ExportFilter,
    IdempotencyRequest,
    ImportOutcome,
    Message,
    MessageCreate,
    MessageQuery,
    Order,
    Precondition,
    Role,
    SearchFilter,
    Session,
    SessionCreate,
    SessionFilter,
    SessionPatch,
    StoredResponse,
    utcnow,
)
from chatsessions.storage.base import SessionRepository
from chatsessions.text import SearchQuery
from tests.conftest import drop_postgres_schema, make_settings

pytestmark = pytest.mark.asyncio

A = "tenant-a"
B = "tenant-b"
LIFECYCLE_BACKENDS = ["memory", "sqlite", "postgres"]

Opener = Callable[..., Any]


@pytest_asyncio.fixture(params=LIFECYCLE_BACKENDS)
async def open_repository(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Open the backend with setting overrides (at most one repository per test)."""
    opened: list[tuple[Any, SessionRepository]] = []
    from chatsessions.main import build_repository

    async def opener(**overrides: object) -> SessionRepository:
        settings = make_settings(request.param, tmp_path, **overrides)
        repo = await build_repository(settings)
        opened.append((settings, repo))
        return repo

    try:
        yield opener
    finally:
        for settings, repo in opened:
            await repo.aclose()
            await drop_postgres_schema(settings)


@pytest_asyncio.fixture
async def repo(open_repository: Opener) -> SessionRepository:
    repository: SessionRepository = await open_repository()
    return repository


def say(*texts: str, **extra: Any) -> list[MessageCreate]:
    return [MessageCreate.model_validate({"role": Role.user, "content": t, **extra}) for t in texts]


async def make(repo: SessionRepository, sid: str, tenant: str = A, **fields: Any) -> Session:
    return await repo.create_session(tenant, SessionCreate.model_validate({"id": sid, **fields}))


async def page(repo: SessionRepository, sid: str, **query: Any) -> tuple[list[int], bool]:
    items, more = await repo.list_messages(A, sid, MessageQuery(**query))
    return [m.seq for m in items], more


# --- deleting one message -------------------------------------------------------------


async def test_delete_message_is_one_version_step_and_its_seq_is_never_reused(repo: SessionRepository) -> None:
    await make(repo, "s")
    await repo.append_messages(A, "s", say("one", "two", "three"))
    session = await repo.delete_message(A, "s", 2)
    assert (session.version, session.message_count, session.last_seq) == (3, 2, 3)
    with pytest.raises(MessageNotFound):
        await repo.get_message(A, "s", 2)
    _, added = await repo.append_messages(A, "s", say("four"))
    assert added[0].seq == 4
    assert await page(repo, "s") == ([1, 3, 4], False)
    assert await page(repo, "s", order=Order.desc) == ([4, 3, 1], False)
    got = await repo.get_session(A, "s")
    assert got is not None
    assert (got.message_count, got.last_seq, got.version) == (3, 4, 4)


async def test_paging_counts_live_messages_only(repo: SessionRepository) -> None:
    await make(repo, "s")
    await repo.append_messages(A, "s", say(*[f"m{i}" for i in range(1, 7)]))
    for seq in (3, 4, 6):
        await repo.delete_message(A, "s", seq)
    assert await page(repo, "s", limit=2) == ([1, 2], True)
    assert await page(repo, "s", after=2, limit=1) == ([5], False)
    assert await page(repo, "s", after=2, limit=2) == ([5], False)
    assert await page(repo, "s", order=Order.desc, limit=1) == ([5], True)
    assert await page(repo, "s", order=Order.desc, before=5, limit=2) == ([2, 1], False)
    assert await page(repo, "s", before=2, order=Order.desc, limit=1) == ([1], False)


async def test_delete_message_checks_if_match_and_existence(repo: SessionRepository) -> None:
    await make(repo, "s")
    await repo.append_messages(A, "s", say("one"))
    with pytest.raises(PreconditionFailed):
        await repo.delete_message(A, "s", 1, if_match=Precondition(versions=frozenset({1})))
    with pytest.raises(MessageNotFound):
        await repo.delete_message(A, "s", 9)
    with pytest.raises(SessionNotFound):
        await repo.delete_message(A, "nope", 1)
    with pytest.raises(SessionNotFound):
        await repo.delete_message(B, "s", 1)  # another tenant cannot detect it
    await repo.delete_message(A, "s", 1, if_match=Precondition(versions=frozenset({2})))
    with pytest.raises(MessageNotFound):
        await repo.delete_message(A, "s", 1)
    got = await repo.get_session(A, "s")
    assert got is not None
    assert (got.version, got.message_count) == (3, 0)


async def test_a_deleted_message_leaves_search_and_citations(repo: SessionRepository) -> None:
    await make(repo, "s")
    await repo.append_messages(A, "s", say("zebra crossing", references=[{"doc_id": "d1"}]))
    await repo.append_messages(A, "s", say("zebra stripes", references=[{"doc_id": "d1"}]))
    await repo.delete_message(A, "s", 1)
    hits = await repo.search(A, SearchQuery.parse("zebra"), filters=SearchFilter(), limit=10, offset=0)
    assert [h.seq for h in hits.items] == [2]
    cited = await repo.list_citations(A, "d1", filters=CitationFilter(), limit=10, cursor=None)
    assert [c.seq for c in cited.items] == [2]


# --- retention ----------------------------------------------------------------------------


async def test_expires_at_and_pinned_are_kept_and_patched(repo: SessionRepository) -> None:
    later = utcnow() + timedelta(days=1)
    session = await make(repo, "s", expires_at=later.isoformat(), pinned=True)
    assert session.expires_at == later
    assert session.pinned
    got = await repo.get_session(A, "s")
    assert got is not None
    assert got.expires_at == later
    assert got.pinned
    patched = await repo.patch_session(A, "s", SessionPatch.model_validate({"expires_at": None, "pinned": False}))
    assert patched.expires_at is None
    assert not patched.pinned
    got = await repo.get_session(A, "s")
    assert got is not None
    assert got.expires_at is None
    assert not got.pinned
    await make(repo, "t")
    pinned = await repo.list_sessions(A, filters=SessionFilter(pinned=True), limit=10, cursor=None)
    assert pinned.items == []
    await repo.patch_session(A, "t", SessionPatch(pinned=True))
    pinned = await repo.list_sessions(A, filters=SessionFilter(pinned=True), limit=10, cursor=None)
    unpinned = await repo.list_sessions(A, filters=SessionFilter(pinned=False), limit=10, cursor=None)
    assert [s.id for s in pinned.items] == ["t"]
    assert [s.id for s in unpinned.items] == ["s"]


async def _expire_soon(repo: SessionRepository, sid: str, tenant: str = A) -> datetime:
    """A session that expires a moment from now, with a message that cites a document; when it expires."""
    soon = utcnow() + timedelta(seconds=1)
    await make(repo, sid, tenant, expires_at=soon.isoformat(), user_id="u")
    await repo.append_messages(tenant, sid, say("ephemeral words", references=[{"doc_id": "d"}]))
    return soon


async def _until(moment: datetime) -> None:
    await asyncio.sleep(max(0.0, (moment - utcnow()).total_seconds()) + 0.05)


async def _assert_gone(repo: SessionRepository, sid: str) -> None:
    assert await repo.get_session(A, sid) is None
    with pytest.raises(SessionNotFound):
        await repo.list_messages(A, sid, MessageQuery())
    with pytest.raises(SessionNotFound):
        await repo.get_message(A, sid, 1)
    with pytest.raises(SessionNotFound):
        await repo.append_messages(A, sid, say("more"))
    with pytest.raises(SessionNotFound):
        await repo.patch_session(A, sid, SessionPatch(title="x"))
    with pytest.raises(SessionNotFound):
        await repo.clear_messages(A, sid)
    with pytest.raises(SessionNotFound):
        await repo.delete_session(A, sid)
    listing = await repo.list_sessions(A, filters=SessionFilter(), limit=100, cursor=None)
    assert sid not in [s.id for s in listing.items]
    exported = await repo.export_sessions(A, filters=ExportFilter(), after=None, limit=100)
    assert sid not in [s.id for s in exported]
    hits = await repo.search(A, SearchQuery.parse("ephemeral"), filters=SearchFilter(), limit=10, offset=0)
    assert [h.session_id for h in hits.items if h.session_id == sid] == []
    cited = await repo.list_citations(A, "d", filters=CitationFilter(), limit=10, cursor=None)
    assert [c.session_id for c in cited.items if c.session_id == sid] == []


async def test_an_expired_session_is_gone_from_every_read_at_once(repo: SessionRepository) -> None:
    expiry = await _expire_soon(repo, "gone")
    await make(repo, "kept")
    if utcnow() < expiry - timedelta(milliseconds=100):  # a loaded machine may take longer
        assert await repo.get_session(A, "gone") is not None
    await _until(expiry)
    await _assert_gone(repo, "gone")
    assert await repo.get_session(A, "kept") is not None
    # Its id is free again: a create makes a new session, not a 409.
    fresh = await make(repo, "gone")
    assert (fresh.version, fresh.last_seq) == (1, 0)
    assert await page(repo, "gone") == ([], False)


async def test_the_idle_rule_expires_unpinned_sessions(open_repository: Opener) -> None:
    repo: SessionRepository = await open_repository(retention_idle_seconds=1.0)
    idle = await make(repo, "idle")
    await make(repo, "pinned", pinned=True)
    await make(repo, "busy")
    while utcnow() < idle.updated_at + timedelta(seconds=1.1):
        await asyncio.sleep(0.2)
        await repo.append_messages(A, "busy", say("still here"))
    assert await repo.get_session(A, "idle") is None
    assert await repo.get_session(A, "pinned") is not None
    assert await repo.get_session(A, "busy") is not None
    with pytest.raises(SessionNotFound):
        await repo.append_messages(A, "idle", say("late"))
    listing = await repo.list_sessions(A, filters=SessionFilter(), limit=100, cursor=None)
    assert sorted(s.id for s in listing.items) == ["busy", "pinned"]


async def test_the_purge_removes_expired_sessions_and_only_them(repo: SessionRepository) -> None:
    expiries = [await _expire_soon(repo, f"e{i}") for i in range(3)]
    await make(repo, "kept")
    await _until(max(expiries))
    assert await repo.purge() == 3
    assert await repo.purge() == 0
    assert await repo.get_session(A, "kept") is not None
    with pytest.raises(SessionExists):
        await make(repo, "kept")


# --- erasure ---------------------------------------------------------------------------------


async def test_delete_sessions_erases_one_users_sessions(repo: SessionRepository) -> None:
    await make(repo, "u1", user_id="alice", document_id="d1")
    await make(repo, "u2", user_id="alice", document_id="d2")
    await make(repo, "u3", user_id="alice", document_id="d2")
    await make(repo, "v1", user_id="bob")
    await make(repo, "w1", B, user_id="alice")
    await repo.append_messages(A, "u2", say("hello"))
    assert await repo.delete_sessions(A, user_id="alice", document_id="d2") == 2
    assert await repo.get_session(A, "u2") is None
    assert await repo.get_session(A, "u1") is not None
    assert await repo.delete_sessions(A, user_id="alice") == 1
    assert await repo.delete_sessions(A, user_id="alice") == 0
    assert await repo.get_session(A, "v1") is not None
    assert await repo.get_session(B, "w1") is not None


# --- export and import -----------------------------------------------------------------------


async def _all_messages(repo: SessionRepository, tenant: str, sid: str) -> list[Message]:
    items, more = await repo.list_messages(tenant, sid, MessageQuery(limit=1000))
    assert not more
    return items


async def test_import_keeps_every_field_and_skip_or_replace(repo: SessionRepository) -> None:
    await make(repo, "s", user_id="u", title="t", metadata={"k": [1, 2]})
    await repo.append_messages(A, "s", say("a", "b", "c", metadata={"m": 1}, references=[{"doc_id": "x"}]))
    await repo.delete_message(A, "s", 2)
    original = await repo.get_session(A, "s")
    assert original is not None
    messages = await _all_messages(repo, A, "s")

    assert await repo.import_session(B, original, messages, replace=False) is ImportOutcome.created
    assert await repo.get_session(B, "s") == original
    assert await _all_messages(repo, B, "s") == messages
    assert await repo.import_session(B, original, [], replace=False) is ImportOutcome.skipped
    assert await _all_messages(repo, B, "s") == messages

    smaller = original.model_copy(update={"message_count": 1, "version": 9})
    assert await repo.import_session(B, smaller, messages[:1], replace=True) is ImportOutcome.replaced
    assert await repo.get_session(B, "s") == smaller
    assert [m.seq for m in await _all_messages(repo, B, "s")] == [1]
    _, added = await repo.append_messages(B, "s", say("d"))
    assert added[0].seq == 4  # the imported last_seq holds


async def test_export_pages_in_id_order_with_filters(repo: SessionRepository) -> None:
    for sid, user in (("c", "u1"), ("a", "u2"), ("b", "u1")):
        await make(repo, sid, user_id=user, document_id="d")
    await make(repo, "z", B, user_id="u1")
    first = await repo.export_sessions(A, filters=ExportFilter(), after=None, limit=2)
    rest = await repo.export_sessions(A, filters=ExportFilter(), after=first[-1].id, limit=2)
    assert [s.id for s in first + rest] == ["a", "b", "c"]
    mine = await repo.export_sessions(A, filters=ExportFilter(user_id="u1"), after=None, limit=10)
    assert [s.id for s in mine] == ["b", "c"]
    one = await repo.export_sessions(A, filters=ExportFilter(session_id="c", document_id="d"), after=None, limit=10)
    assert [s.id for s in one] == ["c"]


# --- stored answers go with the content they held ------------------------------------------------


def _render(session: Session, messages: list[Message]) -> StoredResponse:
    return StoredResponse(201, b"".join(m.model_dump_json().encode() for m in messages), {})


async def _answered_append(repo: SessionRepository, sid: str, key: str) -> None:
    await make(repo, sid, user_id="eraseme")
    request = IdempotencyRequest(key=key, fingerprint="f", render=_render)
    assert await repo.idempotency_begin(A, key, "f") is None
    await repo.append_messages(A, sid, say("secret words"), idempotency=request)
    assert await repo.idempotency_begin(A, key, "f") is not None  # the answer is stored


async def _answer_gone(repo: SessionRepository, key: str) -> bool:
    found = await repo.idempotency_begin(A, key, "f")
    await repo.idempotency_finish(A, key, None)
    return found is None


async def test_stored_answers_go_with_a_deletion_clear_or_erasure(repo: SessionRepository) -> None:
    await _answered_append(repo, "d", "k-delete")
    await repo.delete_session(A, "d")
    assert await _answer_gone(repo, "k-delete")

    await _answered_append(repo, "c", "k-clear")
    await repo.clear_messages(A, "c")
    assert await _answer_gone(repo, "k-clear")

    await _answered_append(repo, "m", "k-message")
    await repo.delete_message(A, "m", 1)
    assert await _answer_gone(repo, "k-message")

    await _answered_append(repo, "e", "k-erase")
    await repo.delete_sessions(A, user_id="eraseme")
    assert await _answer_gone(repo, "k-erase")


async def test_stored_answers_go_with_an_expired_session_at_the_purge(repo: SessionRepository) -> None:
    await _answered_append(repo, "y", "k-idle")
    await repo.patch_session(A, "y", SessionPatch(expires_at=utcnow() + timedelta(seconds=1)))
    await _until(utcnow() + timedelta(seconds=1))
    assert await repo.purge() == 1
    assert await _answer_gone(repo, "k-idle")
    assert await repo.purge() == 0
