"""The `SessionRepository` contract, run against every backend through the `repository` fixture.

Backend-specific behaviour (crash recovery, compaction, SQL migrations) lives in
the backend's own test module; everything here must hold for all of them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from datetime import timedelta

import pytest
from pydantic import JsonValue

from chatsessions.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    MessageNotFound,
    PreconditionFailed,
    SessionExists,
    SessionNotFound,
)
from chatsessions.models import (
    IdempotencyRequest,
    Message,
    MessageCreate,
    MessageQuery,
    Order,
    Precondition,
    Role,
    Session,
    SessionCreate,
    SessionCursor,
    SessionFilter,
    SessionPatch,
    StoredResponse,
)
from chatsessions.storage.base import SessionRepository

pytestmark = pytest.mark.asyncio

A = "tenant-a"
B = "tenant-b"
NO_FILTER = SessionFilter()


def msg(content: str, role: Role = Role.user, **extra: JsonValue) -> MessageCreate:
    return MessageCreate.model_validate({"role": role, "content": content, **extra})


def at(version: int) -> Precondition:
    return Precondition(versions=frozenset({version}))


async def make(repository: SessionRepository, session_id: str, tenant: str = A, **fields: JsonValue) -> Session:
    return await repository.create_session(tenant, SessionCreate.model_validate({"id": session_id, **fields}))


async def with_messages(repository: SessionRepository, session_id: str, count: int, tenant: str = A) -> Session:
    await make(repository, session_id, tenant)
    session, _ = await repository.append_messages(tenant, session_id, [msg(f"m{i}") for i in range(1, count + 1)])
    return session


async def all_messages(repository: SessionRepository, session_id: str, tenant: str = A) -> list[Message]:
    items, more = await repository.list_messages(tenant, session_id, MessageQuery(limit=1000))
    assert not more
    return items


async def list_all(
    repository: SessionRepository, tenant: str = A, *, filters: SessionFilter = NO_FILTER, limit: int = 100
) -> list[Session]:
    found: list[Session] = []
    cursor: SessionCursor | None = None
    while True:
        listing = await repository.list_sessions(tenant, filters=filters, limit=limit, cursor=cursor)
        assert len(listing.items) <= limit
        found.extend(listing.items)
        if listing.next_cursor is None:
            return found
        assert listing.items, "a page with a next_cursor must not be empty"
        cursor = listing.next_cursor


def listing_order(sessions: list[Session]) -> list[str]:
    return [s.id for s in sorted(sessions, key=lambda s: (-s.updated_at.timestamp(), s.id))]


def render_answer(session: Session, messages: list[Message]) -> StoredResponse:
    body = f'{{"session":"{session.id}","version":{session.version},"seqs":{[m.seq for m in messages]}}}'
    return StoredResponse(201, body.encode(), {"ETag": session.etag})


# --- create ----------------------------------------------------------------


async def test_create_with_explicit_id_keeps_every_field(repository: SessionRepository) -> None:
    data = SessionCreate.model_validate(
        {
            "id": "s-1_A",
            "user_id": "u1",
            "document_id": "d1",
            "section_id": "sec1",
            "title": "Über «titles» 🎉",
            "settings": {"model": "gpt", "mode": "rag", "options": {"temperature": 0.2}, "extra_key": [1, 2]},
            "metadata": {"nested": {"list": [1, "two", None, True]}, "n": 1.5},
        }
    )
    created = await repository.create_session(A, data)

    assert created.id == "s-1_A"
    assert (created.user_id, created.document_id, created.section_id) == ("u1", "d1", "sec1")
    assert created.title == "Über «titles» 🎉"
    assert created.settings.model_dump() == {
        "model": "gpt",
        "mode": "rag",
        "options": {"temperature": 0.2},
        "extra_key": [1, 2],
    }
    assert created.metadata == {"nested": {"list": [1, "two", None, True]}, "n": 1.5}
    assert (created.message_count, created.last_seq, created.version) == (0, 0, 1)
    assert created.created_at == created.updated_at
    assert created.created_at.utcoffset() == timedelta(0)
    assert await repository.get_session(A, "s-1_A") == created


async def test_create_without_id_makes_a_uuid4(repository: SessionRepository) -> None:
    first = await repository.create_session(A, SessionCreate())
    second = await repository.create_session(A, SessionCreate())

    assert uuid.UUID(first.id).version == 4
    assert first.id != second.id
    assert await repository.get_session(A, first.id) == first


async def test_create_existing_id_raises_and_keeps_the_original(repository: SessionRepository) -> None:
    original = await make(repository, "dup", title="first")
    with pytest.raises(SessionExists):
        await make(repository, "dup", title="second")
    assert await repository.get_session(A, "dup") == original


async def test_ids_differing_only_in_case_are_distinct_sessions(repository: SessionRepository) -> None:
    await make(repository, "Chat", title="upper")
    await make(repository, "chat", title="lower")
    await make(repository, "CHAT", title="all-caps")

    upper, lower, caps = [await repository.get_session(A, i) for i in ("Chat", "chat", "CHAT")]
    assert upper is not None
    assert lower is not None
    assert caps is not None
    assert (upper.title, lower.title, caps.title) == ("upper", "lower", "all-caps")
    await repository.append_messages(A, "chat", [msg("only in lower")])
    assert await all_messages(repository, "Chat") == []
    assert [m.content for m in await all_messages(repository, "chat")] == ["only in lower"]


async def test_unusual_but_valid_ids_round_trip(repository: SessionRepository) -> None:
    ids = ["-", "_", "--", "__init__", "con", "NUL", "lpt1", "a" * 128]
    for session_id in ids:
        await make(repository, session_id)
        await repository.append_messages(A, session_id, [msg(session_id)])
    for session_id in ids:
        session = await repository.get_session(A, session_id)
        assert session is not None, session_id
        assert (session.id, session.message_count) == (session_id, 1)
        assert [m.content for m in await all_messages(repository, session_id)] == [session_id]
    assert sorted(s.id for s in await list_all(repository)) == sorted(ids)


# --- get / get_or_create -------------------------------------------------------


async def test_get_missing_returns_none(repository: SessionRepository) -> None:
    assert await repository.get_session(A, "missing") is None


async def test_get_or_create_creates_then_returns_existing_unchanged(repository: SessionRepository) -> None:
    created, was_created = await repository.get_or_create_session(A, "goc", SessionCreate(title="first", user_id="u1"))
    assert was_created
    assert (created.id, created.title, created.user_id, created.version) == ("goc", "first", "u1", 1)

    again, was_created = await repository.get_or_create_session(A, "goc", SessionCreate(title="second"))
    assert not was_created
    assert again == created
    assert await repository.get_session(A, "goc") == created


async def test_get_or_create_returns_a_changed_session_as_it_is(repository: SessionRepository) -> None:
    await make(repository, "goc")
    appended, _ = await repository.append_messages(A, "goc", [msg("x")])

    found, was_created = await repository.get_or_create_session(A, "goc", SessionCreate(title="ignored"))
    assert not was_created
    assert found == appended


async def test_racing_get_or_create_creates_exactly_once(repository: SessionRepository) -> None:
    results = await asyncio.gather(
        *(repository.get_or_create_session(A, "race", SessionCreate(title=f"t{i}")) for i in range(50))
    )

    created = [session for session, was_created in results if was_created]
    assert len(created) == 1
    assert {session.model_dump_json() for session, _ in results} == {created[0].model_dump_json()}
    assert [s.id for s in await list_all(repository)] == ["race"]


# --- list ----------------------------------------------------------------------


async def test_list_empty(repository: SessionRepository) -> None:
    listing = await repository.list_sessions(A, filters=NO_FILTER, limit=10, cursor=None)
    assert listing.items == []
    assert listing.next_cursor is None


async def test_list_newest_updated_first_then_id(repository: SessionRepository) -> None:
    for session_id in ("s3", "s1", "s2", "s4"):
        await make(repository, session_id)
    await repository.patch_session(A, "s1", SessionPatch(title="touched"))
    await repository.append_messages(A, "s3", [msg("touched")])

    listed = await list_all(repository)
    current = [s for s in [await repository.get_session(A, i) for i in ("s1", "s2", "s3", "s4")] if s is not None]
    assert listed == sorted(listed, key=lambda s: (-s.updated_at.timestamp(), s.id))
    assert [s.id for s in listed] == listing_order(current)
    assert listed[0].id == "s3"
    assert listed[1].id == "s1"


async def test_list_items_are_current(repository: SessionRepository) -> None:
    await make(repository, "s1")
    appended, _ = await repository.append_messages(A, "s1", [msg("a"), msg("b")])
    assert await list_all(repository) == [appended]


async def test_list_filters(repository: SessionRepository) -> None:
    await make(repository, "a", user_id="u1", document_id="d1", section_id="x")
    await make(repository, "b", user_id="u1", document_id="d1", section_id="y")
    await make(repository, "c", user_id="u1", document_id="d2")
    await make(repository, "d", user_id="u2", document_id="d1", section_id="x")
    await make(repository, "e")
    cases = [
        (SessionFilter(user_id="u1"), ["a", "b", "c"]),
        (SessionFilter(user_id="u2"), ["d"]),
        (SessionFilter(document_id="d1"), ["a", "b", "d"]),
        (SessionFilter(section_id="x"), ["a", "d"]),
        (SessionFilter(user_id="u1", document_id="d1"), ["a", "b"]),
        (SessionFilter(user_id="u1", document_id="d1", section_id="x"), ["a"]),
        (SessionFilter(user_id="nobody"), []),
        (SessionFilter(user_id="U1"), []),
        (NO_FILTER, ["a", "b", "c", "d", "e"]),
    ]
    failures = []
    for filters, expected in cases:
        got = sorted(s.id for s in await list_all(repository, filters=filters, limit=2))
        if got != expected:
            failures.append(f"{filters}: expected {expected}, got {got}")
    assert failures == []


async def test_list_filter_follows_a_patch(repository: SessionRepository) -> None:
    await make(repository, "a", user_id="u1")
    await repository.patch_session(A, "a", SessionPatch(user_id="u2"))

    assert await list_all(repository, filters=SessionFilter(user_id="u1")) == []
    assert [s.id for s in await list_all(repository, filters=SessionFilter(user_id="u2"))] == ["a"]


async def test_list_paging_covers_every_session_exactly_once(repository: SessionRepository) -> None:
    ids = [f"s{i:02}" for i in range(25)]
    for session_id in ids:
        await make(repository, session_id)
    for session_id in ids[::4]:
        await repository.patch_session(A, session_id, SessionPatch(title="bumped"))
    current = [s for s in [await repository.get_session(A, i) for i in ids] if s is not None]

    for limit in (1, 3, 7, 25, 26, 100):
        pages: list[list[str]] = []
        cursor: SessionCursor | None = None
        while True:
            listing = await repository.list_sessions(A, filters=NO_FILTER, limit=limit, cursor=cursor)
            pages.append([s.id for s in listing.items])
            if listing.next_cursor is None:
                break
            cursor = listing.next_cursor

        flat = [i for page in pages for i in page]
        assert flat == listing_order(current), limit
        assert all(len(page) == limit for page in pages[:-1]), limit
        assert 1 <= len(pages[-1]) <= limit, limit
        assert len(pages) == -(-len(ids) // limit), limit


async def test_list_exactly_limit_sessions_has_no_next_cursor(repository: SessionRepository) -> None:
    for i in range(3):
        await make(repository, f"s{i}")
    listing = await repository.list_sessions(A, filters=NO_FILTER, limit=3, cursor=None)
    assert len(listing.items) == 3
    assert listing.next_cursor is None


async def test_list_excludes_deleted_sessions(repository: SessionRepository) -> None:
    await make(repository, "keep")
    await make(repository, "gone")
    await repository.delete_session(A, "gone")
    assert [s.id for s in await list_all(repository)] == ["keep"]


# --- patch -----------------------------------------------------------------------


async def test_patch_sets_only_the_given_fields(repository: SessionRepository) -> None:
    before = await make(repository, "p", user_id="u1", document_id="d1", section_id="x", title="old")
    after = await repository.patch_session(A, "p", SessionPatch(title="new"))

    assert after.title == "new"
    assert (after.user_id, after.document_id, after.section_id) == ("u1", "d1", "x")
    assert after.version == before.version + 1
    assert after.updated_at > before.updated_at
    assert after.created_at == before.created_at
    assert await repository.get_session(A, "p") == after


async def test_patch_null_clears_scalar_fields(repository: SessionRepository) -> None:
    await make(repository, "p", user_id="u1", document_id="d1", section_id="x", title="old")
    after = await repository.patch_session(
        A, "p", SessionPatch.model_validate({"title": None, "user_id": None, "document_id": None, "section_id": None})
    )
    assert (after.title, after.user_id, after.document_id, after.section_id) == (None, None, None, None)
    assert await repository.get_session(A, "p") == after


async def test_patch_merges_metadata_and_null_removes_a_member(repository: SessionRepository) -> None:
    await make(repository, "p", metadata={"keep": 1, "drop": 2, "deep": {"a": 1, "b": 2}, "list": [1, 2]})
    after = await repository.patch_session(
        A,
        "p",
        SessionPatch.model_validate(
            {"metadata": {"drop": None, "deep": {"b": None, "c": 3}, "list": [3], "new": {"x": "y"}}}
        ),
    )
    assert after.metadata == {"keep": 1, "deep": {"a": 1, "c": 3}, "list": [3], "new": {"x": "y"}}
    assert await repository.get_session(A, "p") == after


async def test_patch_null_metadata_and_settings_reset_them(repository: SessionRepository) -> None:
    await make(repository, "p", metadata={"a": 1}, settings={"model": "m", "mode": "chat", "custom": 1})
    after = await repository.patch_session(A, "p", SessionPatch.model_validate({"metadata": None, "settings": None}))
    assert after.metadata == {}
    assert after.settings.model_dump() == {"model": None, "mode": None, "options": None}
    assert await repository.get_session(A, "p") == after


async def test_patch_merges_settings(repository: SessionRepository) -> None:
    await make(repository, "p", settings={"model": "m1", "mode": "chat", "options": {"t": 1, "k": 5}, "custom": "c"})
    after = await repository.patch_session(
        A, "p", SessionPatch.model_validate({"settings": {"model": "m2", "mode": None, "options": {"k": None}}})
    )
    assert after.settings.model_dump() == {"model": "m2", "mode": None, "options": {"t": 1}, "custom": "c"}
    assert await repository.get_session(A, "p") == after


async def test_patch_with_matching_if_match(repository: SessionRepository) -> None:
    await make(repository, "p")
    after = await repository.patch_session(A, "p", SessionPatch(title="x"), if_match=at(1))
    assert after.version == 2
    after = await repository.patch_session(
        A, "p", SessionPatch(title="y"), if_match=Precondition(versions=frozenset({7, 2}))
    )
    assert after.version == 3
    after = await repository.patch_session(A, "p", SessionPatch(title="z"), if_match=Precondition(any=True))
    assert (after.version, after.title) == (4, "z")


async def test_patch_stale_if_match_changes_nothing(repository: SessionRepository) -> None:
    await make(repository, "p", title="old")
    current = await repository.patch_session(A, "p", SessionPatch(title="v2"))
    for stale in (at(1), at(3), at(2**63), at(2**70), Precondition(versions=frozenset())):
        with pytest.raises(PreconditionFailed):
            await repository.patch_session(A, "p", SessionPatch(title="lost"), if_match=stale)
    assert await repository.get_session(A, "p") == current


async def test_patch_missing_session(repository: SessionRepository) -> None:
    with pytest.raises(SessionNotFound):
        await repository.patch_session(A, "missing", SessionPatch(title="x"))
    assert await repository.get_session(A, "missing") is None


# --- delete ----------------------------------------------------------------------


async def test_delete_then_not_found(repository: SessionRepository) -> None:
    await with_messages(repository, "d", 3)
    await repository.delete_session(A, "d")

    assert await repository.get_session(A, "d") is None
    with pytest.raises(SessionNotFound):
        await repository.delete_session(A, "d")
    with pytest.raises(SessionNotFound):
        await repository.list_messages(A, "d", MessageQuery())
    with pytest.raises(SessionNotFound):
        await repository.get_message(A, "d", 1)
    with pytest.raises(SessionNotFound):
        await repository.append_messages(A, "d", [msg("late")])
    with pytest.raises(SessionNotFound):
        await repository.clear_messages(A, "d")


async def test_recreated_session_starts_empty(repository: SessionRepository) -> None:
    await with_messages(repository, "d", 3)
    await repository.delete_session(A, "d")

    again = await make(repository, "d")
    assert (again.version, again.message_count, again.last_seq) == (1, 0, 0)
    assert await all_messages(repository, "d") == []
    _, added = await repository.append_messages(A, "d", [msg("new")])
    assert [m.seq for m in added] == [1]
    assert [m.content for m in await all_messages(repository, "d")] == ["new"]

    await repository.delete_session(A, "d")
    session, created = await repository.get_or_create_session(A, "d", SessionCreate(title="third"))
    assert created
    assert (session.title, session.version, session.last_seq) == ("third", 1, 0)
    assert await all_messages(repository, "d") == []


async def test_delete_if_match(repository: SessionRepository) -> None:
    await make(repository, "d")
    current, _ = await repository.append_messages(A, "d", [msg("x")])
    with pytest.raises(PreconditionFailed):
        await repository.delete_session(A, "d", if_match=at(1))
    assert await repository.get_session(A, "d") == current
    assert len(await all_messages(repository, "d")) == 1

    await repository.delete_session(A, "d", if_match=at(2))
    assert await repository.get_session(A, "d") is None


async def test_delete_missing(repository: SessionRepository) -> None:
    with pytest.raises(SessionNotFound):
        await repository.delete_session(A, "missing")


# --- append ----------------------------------------------------------------------


async def test_append_one(repository: SessionRepository) -> None:
    before = await make(repository, "m")
    session, added = await repository.append_messages(
        A,
        "m",
        [msg("hello", Role.user, metadata={"lang": "en", "deep": {"x": [1]}}, references=[{"doc_id": "d", "page": 3}])],
    )

    (message,) = added
    assert message.seq == 1
    assert (message.role, message.content) == (Role.user, "hello")
    assert message.metadata == {"lang": "en", "deep": {"x": [1]}}
    assert message.references == [{"doc_id": "d", "page": 3}]
    assert message.created_at.utcoffset() == timedelta(0)
    assert (session.message_count, session.last_seq, session.version) == (1, 1, 2)
    assert session.updated_at > before.updated_at
    assert session.created_at == before.created_at
    assert await repository.get_session(A, "m") == session
    assert await repository.get_message(A, "m", 1) == message


async def test_append_batch_is_one_change_with_contiguous_seqs(repository: SessionRepository) -> None:
    await make(repository, "m")
    await repository.append_messages(A, "m", [msg("first")])
    roles = [Role.system, Role.user, Role.assistant, Role.tool]
    session, added = await repository.append_messages(A, "m", [msg(f"b{i}", role) for i, role in enumerate(roles)])

    assert [m.seq for m in added] == [2, 3, 4, 5]
    assert [m.role for m in added] == roles
    assert [m.content for m in added] == ["b0", "b1", "b2", "b3"]
    assert (session.message_count, session.last_seq, session.version) == (5, 5, 3)
    assert await all_messages(repository, "m") == [await repository.get_message(A, "m", 1), *added]


CONTENTS = [
    "",
    "line one\nline two\r\n\ttabbed",
    'quotes " and \\ backslashes',
    "nul \x00 inside",
    "emoji 🎉 and CJK 漢字 and RTL שלום",
    "x" * 200_000,
    '{"looks": "like a record"}\n{"seq": 999}',
    "\u2028\u2029 separators",
]


async def test_append_content_round_trips_exactly(repository: SessionRepository) -> None:
    await make(repository, "m")
    _, added = await repository.append_messages(A, "m", [msg(content) for content in CONTENTS])
    assert [m.content for m in added] == CONTENTS
    for content in CONTENTS:
        await repository.append_messages(A, "m", [msg(content)])

    stored = await all_messages(repository, "m")
    assert [m.content for m in stored] == CONTENTS + CONTENTS
    assert [m.seq for m in stored] == list(range(1, 2 * len(CONTENTS) + 1))
    assert (await repository.get_message(A, "m", 4)).content == CONTENTS[3]


async def test_append_stale_if_match_appends_nothing(repository: SessionRepository) -> None:
    await make(repository, "m")
    current, _ = await repository.append_messages(A, "m", [msg("one")])
    with pytest.raises(PreconditionFailed):
        await repository.append_messages(A, "m", [msg("two")], if_match=at(1))
    with pytest.raises(PreconditionFailed):
        await repository.append_messages(A, "m", [msg("two"), msg("three")], if_match=at(1))
    assert await repository.get_session(A, "m") == current
    assert [m.content for m in await all_messages(repository, "m")] == ["one"]

    session, _ = await repository.append_messages(A, "m", [msg("two")], if_match=at(2))
    assert session.version == 3


async def test_append_to_missing_session(repository: SessionRepository) -> None:
    with pytest.raises(SessionNotFound):
        await repository.append_messages(A, "missing", [msg("x")])
    assert await repository.get_session(A, "missing") is None


# --- list_messages / get_message -------------------------------------------------------


PAGES: list[tuple[MessageQuery, list[int], bool]] = [
    (MessageQuery(), list(range(1, 11)), False),
    (MessageQuery(limit=10), list(range(1, 11)), False),
    (MessageQuery(limit=9), list(range(1, 10)), True),
    (MessageQuery(limit=3), [1, 2, 3], True),
    (MessageQuery(limit=1), [1], True),
    (MessageQuery(after=0), list(range(1, 11)), False),
    (MessageQuery(after=6, limit=3), [7, 8, 9], True),
    (MessageQuery(after=7, limit=3), [8, 9, 10], False),
    (MessageQuery(after=10), [], False),
    (MessageQuery(after=50), [], False),
    (MessageQuery(before=4), [1, 2, 3], False),
    (MessageQuery(before=4, limit=2), [1, 2], True),
    (MessageQuery(before=1), [], False),
    (MessageQuery(before=11), list(range(1, 11)), False),
    (MessageQuery(before=50, limit=10), list(range(1, 11)), False),
    (MessageQuery(after=2, before=6), [3, 4, 5], False),
    (MessageQuery(after=2, before=6, limit=3), [3, 4, 5], False),
    (MessageQuery(after=2, before=6, limit=2), [3, 4], True),
    (MessageQuery(after=5, before=6), [], False),
    (MessageQuery(after=5, before=5), [], False),
    (MessageQuery(after=6, before=3), [], False),
    (MessageQuery(order=Order.desc), list(range(10, 0, -1)), False),
    (MessageQuery(order=Order.desc, limit=1), [10], True),
    (MessageQuery(order=Order.desc, limit=3), [10, 9, 8], True),
    (MessageQuery(order=Order.desc, limit=10), list(range(10, 0, -1)), False),
    (MessageQuery(order=Order.desc, before=5, limit=3), [4, 3, 2], True),
    (MessageQuery(order=Order.desc, before=4, limit=3), [3, 2, 1], False),
    (MessageQuery(order=Order.desc, after=7), [10, 9, 8], False),
    (MessageQuery(order=Order.desc, after=7, limit=2), [10, 9], True),
    (MessageQuery(order=Order.desc, after=2, before=6, limit=2), [5, 4], True),
    (MessageQuery(order=Order.desc, after=2, before=6, limit=3), [5, 4, 3], False),
    (MessageQuery(order=Order.desc, after=10), [], False),
    (MessageQuery(order=Order.desc, before=1), [], False),
]


async def test_list_messages_paging(repository: SessionRepository) -> None:
    await with_messages(repository, "m", 10)
    failures = []
    for query, seqs, has_more in PAGES:
        items, more = await repository.list_messages(A, "m", query)
        got = ([m.seq for m in items], more)
        if got != (seqs, has_more):
            failures.append(f"{query}: expected {(seqs, has_more)}, got {got}")
        assert [m.content for m in items] == [f"m{s}" for s in got[0]], query
    assert failures == []


async def test_list_messages_walk_covers_every_message_once(repository: SessionRepository) -> None:
    await with_messages(repository, "m", 7)
    for order in (Order.asc, Order.desc):
        for limit in (1, 2, 3, 4, 7, 8):
            walked: list[int] = []
            bound: int | None = None
            while True:
                query = (
                    MessageQuery(after=bound, limit=limit, order=order)
                    if order is Order.asc
                    else MessageQuery(before=bound, limit=limit, order=order)
                )
                items, more = await repository.list_messages(A, "m", query)
                walked.extend(m.seq for m in items)
                if not more:
                    break
                bound = items[-1].seq
            expected = list(range(1, 8))
            assert walked == (expected if order is Order.asc else expected[::-1]), (order, limit)


async def test_list_messages_of_an_empty_session(repository: SessionRepository) -> None:
    await make(repository, "m")
    for query in (MessageQuery(), MessageQuery(order=Order.desc), MessageQuery(after=3), MessageQuery(before=3)):
        assert await repository.list_messages(A, "m", query) == ([], False)


async def test_list_messages_missing_session(repository: SessionRepository) -> None:
    with pytest.raises(SessionNotFound):
        await repository.list_messages(A, "missing", MessageQuery())


async def test_get_message(repository: SessionRepository) -> None:
    await with_messages(repository, "m", 3)
    message = await repository.get_message(A, "m", 2)
    assert (message.seq, message.content, message.role) == (2, "m2", Role.user)

    for seq in (0, 4, 1000):
        with pytest.raises(MessageNotFound):
            await repository.get_message(A, "m", seq)
    with pytest.raises(SessionNotFound):
        await repository.get_message(A, "missing", 1)


# --- clear -----------------------------------------------------------------------


async def test_clear_keeps_session_and_last_seq(repository: SessionRepository) -> None:
    before = await with_messages(repository, "c", 5)
    after = await repository.clear_messages(A, "c")

    assert (after.message_count, after.last_seq, after.version) == (0, 5, before.version + 1)
    assert after.updated_at > before.updated_at
    assert after.created_at == before.created_at
    assert await repository.get_session(A, "c") == after
    assert await all_messages(repository, "c") == []
    for seq in (1, 5):
        with pytest.raises(MessageNotFound):
            await repository.get_message(A, "c", seq)


async def test_seqs_are_never_reused_after_clear(repository: SessionRepository) -> None:
    await with_messages(repository, "c", 5)
    await repository.clear_messages(A, "c")
    session, added = await repository.append_messages(A, "c", [msg("a"), msg("b"), msg("c")])

    assert [m.seq for m in added] == [6, 7, 8]
    assert (session.message_count, session.last_seq) == (3, 8)
    assert [m.seq for m in await all_messages(repository, "c")] == [6, 7, 8]
    assert (await repository.get_message(A, "c", 7)).content == "b"
    with pytest.raises(MessageNotFound):
        await repository.get_message(A, "c", 5)

    items, more = await repository.list_messages(A, "c", MessageQuery(before=7))
    assert ([m.seq for m in items], more) == ([6], False)
    items, more = await repository.list_messages(A, "c", MessageQuery(after=2, limit=2))
    assert ([m.seq for m in items], more) == ([6, 7], True)
    items, more = await repository.list_messages(A, "c", MessageQuery(order=Order.desc, limit=2))
    assert ([m.seq for m in items], more) == ([8, 7], True)
    items, more = await repository.list_messages(A, "c", MessageQuery(before=6))
    assert (items, more) == ([], False)

    await repository.clear_messages(A, "c")
    _, added = await repository.append_messages(A, "c", [msg("d")])
    assert [m.seq for m in added] == [9]


async def test_clear_empty_session_is_still_a_change(repository: SessionRepository) -> None:
    await make(repository, "c")
    after = await repository.clear_messages(A, "c")
    assert (after.version, after.message_count, after.last_seq) == (2, 0, 0)


async def test_clear_stale_if_match_clears_nothing(repository: SessionRepository) -> None:
    current = await with_messages(repository, "c", 2)
    with pytest.raises(PreconditionFailed):
        await repository.clear_messages(A, "c", if_match=at(1))
    assert await repository.get_session(A, "c") == current
    assert len(await all_messages(repository, "c")) == 2

    after = await repository.clear_messages(A, "c", if_match=at(2))
    assert after.message_count == 0


async def test_clear_missing_session(repository: SessionRepository) -> None:
    with pytest.raises(SessionNotFound):
        await repository.clear_messages(A, "missing")


# --- tenants -----------------------------------------------------------------------


async def test_tenant_cannot_see_or_touch_another_tenants_session(repository: SessionRepository) -> None:
    original = await with_messages(repository, "shared", 2, tenant=A)

    assert await repository.get_session(B, "shared") is None
    assert await list_all(repository, B) == []
    with pytest.raises(SessionNotFound):
        await repository.patch_session(B, "shared", SessionPatch(title="hijack"))
    with pytest.raises(SessionNotFound):
        await repository.patch_session(B, "shared", SessionPatch(title="hijack"), if_match=Precondition(any=True))
    with pytest.raises(SessionNotFound):
        await repository.append_messages(B, "shared", [msg("intruder")])
    with pytest.raises(SessionNotFound):
        await repository.list_messages(B, "shared", MessageQuery())
    with pytest.raises(SessionNotFound):
        await repository.get_message(B, "shared", 1)
    with pytest.raises(SessionNotFound):
        await repository.clear_messages(B, "shared")
    with pytest.raises(SessionNotFound):
        await repository.delete_session(B, "shared")

    assert await repository.get_session(A, "shared") == original
    assert [m.content for m in await all_messages(repository, "shared")] == ["m1", "m2"]


async def test_same_id_in_two_tenants_is_two_sessions(repository: SessionRepository) -> None:
    await with_messages(repository, "shared", 2, tenant=A)
    in_b = await make(repository, "shared", tenant=B, title="b's")
    assert (in_b.version, in_b.message_count, in_b.last_seq) == (1, 0, 0)
    _, added = await repository.append_messages(B, "shared", [msg("b1")])
    assert [m.seq for m in added] == [1]

    session_a = await repository.get_session(A, "shared")
    assert session_a is not None
    assert (session_a.title, session_a.message_count, session_a.last_seq) == (None, 2, 2)
    assert [m.content for m in await all_messages(repository, "shared", A)] == ["m1", "m2"]
    assert [m.content for m in await all_messages(repository, "shared", B)] == ["b1"]
    assert [s.title for s in await list_all(repository, B)] == ["b's"]

    await repository.delete_session(B, "shared")
    assert await repository.get_session(A, "shared") == session_a


async def test_get_or_create_is_per_tenant(repository: SessionRepository) -> None:
    await make(repository, "g", tenant=A, title="a's")
    session, created = await repository.get_or_create_session(B, "g", SessionCreate(title="b's"))
    assert created
    assert session.title == "b's"


# --- idempotency -------------------------------------------------------------------


async def test_idempotency_claim_replay_and_reuse(repository: SessionRepository) -> None:
    answer = StoredResponse(201, b'{"ok":true}', {"Location": "/v1/sessions/x", "ETag": '"1"'})
    assert await repository.idempotency_begin(A, "k1", "fp1") is None
    with pytest.raises(IdempotencyInProgress):
        await repository.idempotency_begin(A, "k1", "fp1")

    await repository.idempotency_finish(A, "k1", answer)
    assert await repository.idempotency_begin(A, "k1", "fp1") == answer
    assert await repository.idempotency_begin(A, "k1", "fp1") == answer
    with pytest.raises(IdempotencyKeyReused):
        await repository.idempotency_begin(A, "k1", "fp2")
    assert await repository.idempotency_begin(A, "k1", "fp1") == answer


async def test_idempotency_stores_client_errors_too(repository: SessionRepository) -> None:
    problem = StoredResponse(404, b'{"status":404}', {})
    assert await repository.idempotency_begin(A, "k", "fp") is None
    await repository.idempotency_finish(A, "k", problem)
    assert await repository.idempotency_begin(A, "k", "fp") == problem


async def test_idempotency_finish_none_releases_the_key(repository: SessionRepository) -> None:
    assert await repository.idempotency_begin(A, "k", "fp") is None
    await repository.idempotency_finish(A, "k", None)
    assert await repository.idempotency_begin(A, "k", "fp") is None


async def test_idempotency_keys_are_per_tenant(repository: SessionRepository) -> None:
    answer = StoredResponse(201, b"a", {})
    assert await repository.idempotency_begin(A, "k", "fp-a") is None
    assert await repository.idempotency_begin(B, "k", "fp-b") is None
    await repository.idempotency_finish(A, "k", answer)
    with pytest.raises(IdempotencyInProgress):
        await repository.idempotency_begin(B, "k", "fp-b")
    await repository.idempotency_finish(B, "k", None)
    assert await repository.idempotency_begin(B, "k", "fp-other") is None
    assert await repository.idempotency_begin(A, "k", "fp-a") == answer


async def test_keys_are_distinct_from_each_other(repository: SessionRepository) -> None:
    assert await repository.idempotency_begin(A, "k", "fp") is None
    assert await repository.idempotency_begin(A, "K", "fp") is None
    assert await repository.idempotency_begin(A, "k2", "fp") is None


async def test_create_with_idempotency_stores_the_rendered_answer(repository: SessionRepository) -> None:
    rendered: list[tuple[Session, list[Message]]] = []

    def render(session: Session, messages: list[Message]) -> StoredResponse:
        rendered.append((session, messages))
        return render_answer(session, messages)

    assert await repository.idempotency_begin(A, "create-1", "fp") is None
    session = await repository.create_session(
        A, SessionCreate(id="idem"), idempotency=IdempotencyRequest(key="create-1", fingerprint="fp", render=render)
    )

    assert rendered == [(session, [])]
    stored = await repository.idempotency_begin(A, "create-1", "fp")
    assert stored == render_answer(session, [])
    with pytest.raises(IdempotencyKeyReused):
        await repository.idempotency_begin(A, "create-1", "other")


async def test_append_with_idempotency_stores_the_rendered_answer(repository: SessionRepository) -> None:
    await make(repository, "idem")
    assert await repository.idempotency_begin(A, "append-1", "fp") is None
    session, added = await repository.append_messages(
        A,
        "idem",
        [msg("a"), msg("b")],
        idempotency=IdempotencyRequest(key="append-1", fingerprint="fp", render=render_answer),
    )

    stored = await repository.idempotency_begin(A, "append-1", "fp")
    assert stored == render_answer(session, added)
    assert stored is not None
    assert stored.body == b'{"session":"idem","version":2,"seqs":[1, 2]}'
    with pytest.raises(IdempotencyKeyReused):
        await repository.idempotency_begin(A, "append-1", "other")
    assert await repository.idempotency_begin(B, "append-1", "other") is None


# --- concurrency -------------------------------------------------------------------


async def test_concurrent_appends_lose_nothing(repository: SessionRepository) -> None:
    await make(repository, "busy")
    results = await asyncio.gather(*(repository.append_messages(A, "busy", [msg(f"c{i}")]) for i in range(100)))

    acknowledged = {added[0].content: added[0].seq for _, added in results}
    assert sorted(acknowledged.values()) == list(range(1, 101))
    assert len(acknowledged) == 100
    stored = await all_messages(repository, "busy")
    assert [m.seq for m in stored] == list(range(1, 101))
    assert {m.content: m.seq for m in stored} == acknowledged
    session = await repository.get_session(A, "busy")
    assert session is not None
    assert (session.message_count, session.last_seq, session.version) == (100, 100, 101)
    assert sorted(s.version for s, _ in results) == list(range(2, 102))


async def test_concurrent_batches_stay_contiguous(repository: SessionRepository) -> None:
    await make(repository, "busy")
    results = await asyncio.gather(
        *(repository.append_messages(A, "busy", [msg(f"b{b}-{i}") for i in range(5)]) for b in range(20))
    )

    starts = []
    for _, added in results:
        seqs = [m.seq for m in added]
        assert seqs == list(range(seqs[0], seqs[0] + 5))
        starts.append(seqs[0])
    assert sorted(starts) == list(range(1, 101, 5))
    stored = await all_messages(repository, "busy")
    assert [m.seq for m in stored] == list(range(1, 101))
    session = await repository.get_session(A, "busy")
    assert session is not None
    assert (session.message_count, session.version) == (100, 21)


async def test_concurrent_appends_to_many_sessions(repository: SessionRepository) -> None:
    ids = [f"s{i}" for i in range(10)]
    for session_id in ids:
        await make(repository, session_id)
    await asyncio.gather(*(repository.append_messages(A, s, [msg(f"{s}-{i}")]) for i in range(10) for s in ids))

    for session_id in ids:
        stored = await all_messages(repository, session_id)
        assert [m.seq for m in stored] == list(range(1, 11))
        assert sorted(m.text for m in stored) == sorted(f"{session_id}-{i}" for i in range(10))


async def test_concurrent_patches_each_get_their_own_version(repository: SessionRepository) -> None:
    await make(repository, "p")
    results = await asyncio.gather(
        *(repository.patch_session(A, "p", SessionPatch.model_validate({"metadata": {f"k{i}": i}})) for i in range(20))
    )
    assert sorted(s.version for s in results) == list(range(2, 22))
    final = await repository.get_session(A, "p")
    assert final is not None
    assert final.version == 21
    assert final.metadata == {f"k{i}": i for i in range(20)}


async def test_concurrent_conditional_appends_only_one_wins(repository: SessionRepository) -> None:
    await make(repository, "cas")
    results = await asyncio.gather(
        *(repository.append_messages(A, "cas", [msg(f"c{i}")], if_match=at(1)) for i in range(20)),
        return_exceptions=True,
    )

    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, PreconditionFailed) for r in results if isinstance(r, BaseException))
    stored = await all_messages(repository, "cas")
    assert [m.content for m in stored] == [winners[0][1][0].content]
    session = await repository.get_session(A, "cas")
    assert session is not None
    assert (session.version, session.message_count) == (2, 1)


async def test_concurrent_conditional_patches_only_one_wins(repository: SessionRepository) -> None:
    await make(repository, "cas")
    results = await asyncio.gather(
        *(repository.patch_session(A, "cas", SessionPatch(title=f"t{i}"), if_match=at(1)) for i in range(20)),
        return_exceptions=True,
    )

    winners = [r for r in results if isinstance(r, Session)]
    assert len(winners) == 1
    assert sum(isinstance(r, PreconditionFailed) for r in results) == 19
    assert await repository.get_session(A, "cas") == winners[0]


async def test_appends_racing_a_delete_never_resurrect_the_session(repository: SessionRepository) -> None:
    await make(repository, "doomed")
    appends = [repository.append_messages(A, "doomed", [msg(f"c{i}")]) for i in range(20)]
    results = await asyncio.gather(
        *appends[:10], repository.delete_session(A, "doomed"), *appends[10:], return_exceptions=True
    )

    for result in results:
        assert not isinstance(result, BaseException) or isinstance(result, SessionNotFound), repr(result)
    assert await repository.get_session(A, "doomed") is None
    assert await list_all(repository) == []
    again = await make(repository, "doomed")
    assert (again.version, again.message_count, again.last_seq) == (1, 0, 0)
    assert await all_messages(repository, "doomed") == []


async def test_appends_racing_clears_keep_the_counters_consistent(repository: SessionRepository) -> None:
    await make(repository, "mixed")
    calls: list[Awaitable[object]] = []
    for i in range(30):
        calls.append(repository.append_messages(A, "mixed", [msg(f"c{i}")]))
        if i % 10 == 5:
            calls.append(repository.clear_messages(A, "mixed"))
    await asyncio.gather(*calls)

    session = await repository.get_session(A, "mixed")
    assert session is not None
    stored = await all_messages(repository, "mixed")
    assert (session.last_seq, session.version) == (30, 1 + 30 + 3)
    assert session.message_count == len(stored)
    seqs = [m.seq for m in stored]
    assert seqs == list(range(31 - len(seqs), 31))


async def test_list_continues_when_the_cursor_session_is_gone(repository: SessionRepository) -> None:
    for i in range(6):
        await make(repository, f"s{i}")
    first = await repository.list_sessions(A, filters=NO_FILTER, limit=3, cursor=None)
    assert first.next_cursor is not None
    await repository.delete_session(A, first.items[-1].id)

    rest = await list_all(repository)
    second = await repository.list_sessions(A, filters=NO_FILTER, limit=3, cursor=first.next_cursor)
    assert [s.id for s in second.items] == [s.id for s in rest][2:5]
    assert second.next_cursor is None


async def test_check_ready_on_an_open_repository(repository: SessionRepository) -> None:
    await repository.check_ready()
