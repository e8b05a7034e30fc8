"""Search and citations: part of the repository contract, run against every backend."""

from __future__ import annotations

import pytest
from pydantic import JsonValue

from chatsessions.errors import InvalidInput
from chatsessions.models import (
    CitationCursor,
    CitationFilter,
    MessageCreate,
    Role,
    SearchFilter,
    SessionCreate,
    SessionFilter,
)
from chatsessions.storage.base import SessionRepository
from chatsessions.text import SearchQuery

pytestmark = pytest.mark.asyncio

A = "tenant-a"
B = "tenant-b"


def msg(content: str, role: Role = Role.user, references: list[dict[str, JsonValue]] | None = None) -> MessageCreate:
    return MessageCreate(role=role, content=content, references=references)


async def hits(
    repository: SessionRepository, q: str, tenant: str = A, *, filters: SearchFilter | None = None
) -> list[tuple[str, int]]:
    result = await repository.search(
        tenant, SearchQuery.parse(q), filters=filters or SearchFilter(), limit=100, offset=0
    )
    return sorted((hit.session_id, hit.seq) for hit in result.items)


async def test_words_match_whatever_their_case_and_accents(repository: SessionRepository) -> None:
    await repository.create_session(A, SessionCreate(id="s"))
    await repository.append_messages(A, "s", [msg("Our Crème Brûlée recipe, step by step"), msg("unrelated text")])
    for q in ("creme", "BRULEE", "crème brûlée", "Recipe", "brûlée   CRÈME"):
        assert await hits(repository, q) == [("s", 1)], q
    assert await hits(repository, "creme chocolate") == []  # every word must match
    assert await hits(repository, "cream") == []


async def test_a_quoted_phrase_matches_only_in_order(repository: SessionRepository) -> None:
    await repository.create_session(A, SessionCreate(id="s"))
    await repository.append_messages(A, "s", [msg("the quick brown fox"), msg("brown is quick")])
    assert await hits(repository, '"quick brown"') == [("s", 1)]
    assert await hits(repository, '"brown quick"') == []
    assert await hits(repository, "quick brown") == [("s", 1), ("s", 2)]
    assert await hits(repository, '"quick brown" fox') == [("s", 1)]
    assert await hits(repository, '"quick brown') == [("s", 1)]  # a quote left open runs to the end


async def test_search_syntax_in_a_query_is_only_words(repository: SessionRepository) -> None:
    await repository.create_session(A, SessionCreate(id="s"))
    await repository.append_messages(A, "s", [msg("NEAR the star: a caret ^ and a colon")])
    assert await hits(repository, "NEAR(star colon)") == [("s", 1)]
    assert await hits(repository, "star* ^caret colon:") == [("s", 1)]
    assert await hits(repository, "OR") == []
    assert await hits(repository, "scope:star") == []  # "scope" is a word like any other, and absent
    with pytest.raises(InvalidInput):
        SearchQuery.parse(' "*" ^ : () ')


async def test_search_sees_only_the_tenant_and_applies_filters(repository: SessionRepository) -> None:
    await repository.create_session(A, SessionCreate(id="a1", user_id="u1", document_id="d1", section_id="x"))
    await repository.create_session(A, SessionCreate(id="a2", user_id="u2", document_id="d2", section_id="y"))
    await repository.create_session(B, SessionCreate(id="a1", user_id="u1"))
    await repository.append_messages(A, "a1", [msg("zebra facts"), msg("zebra answer", Role.assistant)])
    await repository.append_messages(A, "a2", [msg("zebra stripes")])
    await repository.append_messages(B, "a1", [msg("zebra secret of tenant b")])

    assert await hits(repository, "zebra") == [("a1", 1), ("a1", 2), ("a2", 1)]
    assert await hits(repository, "zebra", B) == [("a1", 1)]
    assert await hits(repository, "secret") == []
    assert await hits(repository, "zebra", filters=SearchFilter(user_id="u2")) == [("a2", 1)]
    assert await hits(repository, "zebra", filters=SearchFilter(document_id="d1")) == [("a1", 1), ("a1", 2)]
    assert await hits(repository, "zebra", filters=SearchFilter(section_id="y")) == [("a2", 1)]
    assert await hits(repository, "zebra", filters=SearchFilter(role=Role.assistant)) == [("a1", 2)]
    both = SearchFilter(user_id="u1", role=Role.user)
    assert await hits(repository, "zebra", filters=both) == [("a1", 1)]


async def test_a_hit_has_its_fields_and_a_snippet_around_the_match(repository: SessionRepository) -> None:
    await repository.create_session(A, SessionCreate(id="s"))
    long = "filler " * 200 + "the needle is here" + " more" * 200
    _, (message,) = await repository.append_messages(A, "s", [msg(long, Role.assistant)])
    result = await repository.search(A, SearchQuery.parse("needle"), filters=SearchFilter(), limit=10, offset=0)
    (hit,) = result.items
    assert (hit.session_id, hit.seq, hit.role, hit.created_at) == ("s", 1, Role.assistant, message.created_at)
    assert len(hit.snippet) <= 300
    assert "the needle is here" in hit.snippet
    assert result.next_offset is None


async def test_search_pages_through_every_hit_once(repository: SessionRepository) -> None:
    await repository.create_session(A, SessionCreate(id="s"))
    await repository.append_messages(A, "s", [msg(f"common word number {i}") for i in range(25)])
    seen: list[int] = []
    offset: int | None = 0
    while offset is not None:
        result = await repository.search(
            A, SearchQuery.parse("common"), filters=SearchFilter(), limit=10, offset=offset
        )
        assert len(result.items) <= 10
        seen += [hit.seq for hit in result.items]
        offset = result.next_offset
    assert sorted(seen) == list(range(1, 26))


async def test_a_cleared_or_deleted_message_is_never_found(repository: SessionRepository) -> None:
    for sid in ("cleared", "deleted", "kept"):
        await repository.create_session(A, SessionCreate(id=sid))
        await repository.append_messages(A, sid, [msg(f"walrus in {sid}", references=[{"doc_id": "doc-w"}])])
    await repository.clear_messages(A, "cleared")
    await repository.delete_session(A, "deleted")
    await repository.create_session(A, SessionCreate(id="deleted"))  # the same id again, empty
    assert await hits(repository, "walrus") == [("kept", 1)]
    listing = await repository.list_citations(A, "doc-w", filters=CitationFilter(), limit=10, cursor=None)
    assert [(c.session_id, c.seq) for c in listing.items] == [("kept", 1)]


async def test_citations_list_each_reference_to_a_document_newest_first(repository: SessionRepository) -> None:
    await repository.create_session(A, SessionCreate(id="s1", user_id="u1", section_id="x"))
    await repository.create_session(A, SessionCreate(id="s2", user_id="u2", section_id="y"))
    await repository.create_session(B, SessionCreate(id="s1"))
    refs: list[dict[str, JsonValue]] = [
        {"doc_id": "manual", "page": 3},
        {"doc_id": "other"},
        {"doc_id": "manual", "page": 9},
    ]
    await repository.append_messages(A, "s1", [msg("first", Role.assistant, refs)])
    await repository.append_messages(A, "s2", [msg("second", Role.assistant, [{"doc_id": "manual", "page": 1}])])
    await repository.append_messages(A, "s1", [msg("no refs"), msg("third", Role.assistant, [{"doc_id": "manual"}])])
    await repository.append_messages(B, "s1", [msg("b's", Role.assistant, [{"doc_id": "manual"}])])
    await repository.append_messages(A, "s2", [msg("odd refs", references=[{"doc_id": 7}, {"page": 1}])])

    listing = await repository.list_citations(A, "manual", filters=CitationFilter(), limit=100, cursor=None)
    assert [(c.session_id, c.seq, c.reference) for c in listing.items] == [
        ("s1", 3, {"doc_id": "manual"}),
        ("s2", 1, {"doc_id": "manual", "page": 1}),
        ("s1", 1, {"doc_id": "manual", "page": 3}),
        ("s1", 1, {"doc_id": "manual", "page": 9}),
    ]
    assert listing.next_cursor is None
    assert listing.items[0].created_at >= listing.items[1].created_at >= listing.items[2].created_at

    only_u2 = await repository.list_citations(A, "manual", filters=CitationFilter(user_id="u2"), limit=100, cursor=None)
    assert [(c.session_id, c.seq) for c in only_u2.items] == [("s2", 1)]
    only_x = await repository.list_citations(
        A, "manual", filters=CitationFilter(section_id="x"), limit=100, cursor=None
    )
    assert [(c.session_id, c.seq) for c in only_x.items] == [("s1", 3), ("s1", 1), ("s1", 1)]
    in_b = await repository.list_citations(B, "manual", filters=CitationFilter(), limit=100, cursor=None)
    assert [(c.session_id, c.seq) for c in in_b.items] == [("s1", 1)]
    none = await repository.list_citations(A, "7", filters=CitationFilter(), limit=100, cursor=None)
    assert none.items == []

    paged: list[tuple[str, int, JsonValue]] = []
    cursor: CitationCursor | None = None
    while True:
        page = await repository.list_citations(A, "manual", filters=CitationFilter(), limit=1, cursor=cursor)
        paged += [(c.session_id, c.seq, c.reference.get("page")) for c in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert paged == [("s1", 3, None), ("s2", 1, 1), ("s1", 1, 3), ("s1", 1, 9)]


async def test_sessions_can_be_listed_by_a_cited_document(repository: SessionRepository) -> None:
    for sid in ("s1", "s2", "s3"):
        await repository.create_session(A, SessionCreate(id=sid))
    await repository.append_messages(A, "s1", [msg("a", Role.assistant, [{"doc_id": "d"}, {"doc_id": "d"}])])
    await repository.append_messages(A, "s3", [msg("b", Role.assistant, [{"doc_id": "d"}])])
    await repository.append_messages(A, "s2", [msg("c", Role.assistant, [{"doc_id": "e"}])])
    listing = await repository.list_sessions(A, filters=SessionFilter(cited_doc_id="d"), limit=10, cursor=None)
    assert [s.id for s in listing.items] == ["s3", "s1"]
    first = await repository.list_sessions(A, filters=SessionFilter(cited_doc_id="d"), limit=1, cursor=None)
    assert [s.id for s in first.items] == ["s3"]
    assert first.next_cursor is not None
    rest = await repository.list_sessions(A, filters=SessionFilter(cited_doc_id="d"), limit=1, cursor=first.next_cursor)
    assert [s.id for s in rest.items] == ["s1"]
    other = await repository.list_sessions(B, filters=SessionFilter(cited_doc_id="d"), limit=10, cursor=None)
    assert other.items == []
