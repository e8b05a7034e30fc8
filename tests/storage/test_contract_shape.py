"""The message shape of DESIGN.md ("Messages as LLM APIs shape them") on every backend.

Content parts, tool calls, names, client message ids (unique in their session),
status and `updated_at`: each stored and read back field for field, through the
`repository` fixture (memory, SQLite, PostgreSQL).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatsessions.errors import MessageExists
from chatsessions.models import Message, MessageCreate, MessageQuery, MessageStatus, SearchFilter, SessionCreate
from chatsessions.storage.base import SessionRepository
from chatsessions.text import SearchQuery

pytestmark = pytest.mark.asyncio

A = "tenant-a"

# A tool-calling OpenAI Chat Completions conversation, as a client sends it.
WEATHER_CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
# `arguments` is kept verbatim: spacing, key order and even invalid JSON.
ODD_CALL = {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": '{ "tz":"CET" ,}'}}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": "Prefer metric units."},
    {
        "role": "user",
        "name": "ada",
        "content": [
            {"type": "text", "text": "What is the weather where this photo was taken?"},
            {"type": "image", "url": "https://example.com/oslo.jpg", "mime_type": "image/jpeg", "detail": "low"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO", "detail": "auto"}},
            {"type": "file", "file_id": "file-123", "name": "trip.pdf"},
        ],
    },
    {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL, ODD_CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "14:05"}]},
    {"role": "assistant", "content": "3 °C in Oslo at 14:05.", "name": "helper"},
]
FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")


def creates(messages: list[dict[str, Any]]) -> list[MessageCreate]:
    return [MessageCreate.model_validate(m) for m in messages]


def shown(message: Message) -> dict[str, Any]:
    """A stored message as the API answers it (JSON)."""
    return message.model_dump(mode="json")


async def new_session(repository: SessionRepository, session_id: str = "s") -> None:
    await repository.create_session(A, SessionCreate(id=session_id))


async def history(repository: SessionRepository, session_id: str = "s") -> list[Message]:
    items, more = await repository.list_messages(A, session_id, MessageQuery(limit=1000))
    assert not more
    return items


async def test_an_openai_conversation_round_trips_field_for_field(repository: SessionRepository) -> None:
    await new_session(repository)
    _, added = await repository.append_messages(A, "s", creates(CONVERSATION))
    stored = await history(repository)
    one_by_one = [await repository.get_message(A, "s", m.seq) for m in stored]
    for answer in (added, stored, one_by_one):
        assert len(answer) == len(CONVERSATION)
        for sent, message in zip(CONVERSATION, answer, strict=True):
            got = shown(message)
            for field in FIELDS:
                assert got[field] == sent.get(field), (field, got)


async def test_new_fields_have_their_defaults(repository: SessionRepository) -> None:
    await new_session(repository)
    await repository.append_messages(A, "s", creates([{"role": "user", "content": "hi"}]))
    (message,) = await history(repository)
    assert shown(message) | {"created_at": None, "updated_at": None} == {
        "seq": 1,
        "id": None,
        "role": "user",
        "content": "hi",
        "name": None,
        "tool_calls": None,
        "tool_call_id": None,
        "status": "completed",
        "metadata": None,
        "references": None,
        "created_at": None,
        "updated_at": None,
    }
    assert message.updated_at == message.created_at


async def test_status_and_client_id_are_stored(repository: SessionRepository) -> None:
    await new_session(repository)
    batch = [
        {"role": "assistant", "content": "", "status": "in_progress", "id": "msg_01.a:b-c"},
        {"role": "assistant", "content": "cut", "status": "incomplete"},
    ]
    await repository.append_messages(A, "s", creates(batch))
    first, second = await history(repository)
    assert (first.status, first.id, first.content) == (MessageStatus.in_progress, "msg_01.a:b-c", "")
    assert (second.status, second.id) == (MessageStatus.incomplete, None)


async def test_a_message_id_the_session_has_is_refused_and_nothing_is_stored(repository: SessionRepository) -> None:
    await new_session(repository)
    await repository.append_messages(A, "s", creates([{"role": "user", "content": "a"}]))
    session, _ = await repository.append_messages(A, "s", creates([{"role": "user", "content": "b", "id": "m1"}]))
    for batch in (
        [{"role": "user", "content": "again", "id": "m1"}],
        [{"role": "user", "content": "new", "id": "m2"}, {"role": "user", "content": "again", "id": "m1"}],
    ):
        with pytest.raises(MessageExists) as caught:
            await repository.append_messages(A, "s", creates(batch))
        assert (caught.value.message_id, caught.value.seq) == ("m1", 2)
    assert await repository.get_session(A, "s") == session
    assert [m.id for m in await history(repository)] == [None, "m1"]


async def test_a_batch_repeating_a_message_id_is_refused(repository: SessionRepository) -> None:
    await new_session(repository)
    twice = [{"role": "user", "content": "a", "id": "m"}, {"role": "user", "content": "b", "id": "m"}]
    with pytest.raises(MessageExists) as caught:
        await repository.append_messages(A, "s", creates(twice))
    assert caught.value.seq is None
    assert await history(repository) == []


async def test_message_ids_are_scoped_to_their_session_and_tenant(repository: SessionRepository) -> None:
    await new_session(repository, "s")
    await new_session(repository, "t")
    await repository.create_session("tenant-b", SessionCreate(id="s"))
    one = creates([{"role": "user", "content": "x", "id": "same"}])
    await repository.append_messages(A, "s", one)
    await repository.append_messages(A, "t", one)
    await repository.append_messages("tenant-b", "s", one)
    assert [m.id for m in await history(repository, "t")] == ["same"]


async def test_a_cleared_history_frees_its_message_ids(repository: SessionRepository) -> None:
    await new_session(repository)
    one = creates([{"role": "user", "content": "x", "id": "m"}])
    await repository.append_messages(A, "s", one)
    await repository.clear_messages(A, "s")
    _, (again,) = await repository.append_messages(A, "s", one)
    assert (again.seq, again.id) == (2, "m")


async def test_racing_appends_of_one_message_id_store_it_once(repository: SessionRepository) -> None:
    await new_session(repository)
    one = creates([{"role": "user", "content": "x", "id": "m"}])
    outcomes = await asyncio.gather(
        *(repository.append_messages(A, "s", one) for _ in range(8)), return_exceptions=True
    )
    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    assert all(isinstance(o, MessageExists) for o in outcomes if isinstance(o, BaseException))
    assert [m.id for m in await history(repository)] == ["m"]


async def test_messages_with_and_without_ids_interleave(repository: SessionRepository) -> None:
    await new_session(repository)
    batches = [creates([{"role": "user", "content": str(i), **({"id": f"m{i}"} if i % 2 else {})}]) for i in range(20)]
    await asyncio.gather(*(repository.append_messages(A, "s", batch) for batch in batches))
    stored = await history(repository)
    assert [m.seq for m in stored] == list(range(1, 21))
    assert sorted(m.id for m in stored if m.id is not None) == sorted(f"m{i}" for i in range(1, 20, 2))


async def test_search_finds_the_words_of_text_parts_only(repository: SessionRepository) -> None:
    await new_session(repository)
    parts = [{"type": "text", "text": "zebra crossing"}, {"type": "image", "url": "https://x/quokka.png"}]
    await repository.append_messages(A, "s", creates([{"role": "user", "content": parts}, *CONVERSATION]))

    async def seqs(q: str) -> list[int]:
        found = await repository.search(A, SearchQuery.parse(q), filters=SearchFilter(), limit=10, offset=0)
        return [hit.seq for hit in found.items]

    assert await seqs("zebra") == [1]
    assert await seqs("quokka") == []
    assert await seqs("photo taken") == [4]  # the text part of a user message with images
    hit = (await repository.search(A, SearchQuery.parse("zebra"), filters=SearchFilter(), limit=1, offset=0)).items[0]
    assert hit.snippet == "zebra crossing"
