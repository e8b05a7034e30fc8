"""`ChatSessionsChatStore` against a real server (uvicorn, SQLite store): every method, sync and async."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.storage.chat_store.base import BaseChatStore

from chatsessions.client import AsyncChatSessions, ChatSessions
from chatsessions.integrations.llamaindex import ChatSessionsChatStore
from tests.server.proc import RunningServer, free_port, running_server, server_env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(server_env(CHATSESSIONS_DATA_DIR=tmp_path_factory.mktemp("llamaindex")), free_port()) as up:
        yield up


@pytest.fixture
def store(server: RunningServer) -> Iterator[ChatSessionsChatStore]:
    with ChatSessions(server.base_url) as client:
        yield ChatSessionsChatStore(client=client)


TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
CONVERSATION = [
    ChatMessage(role=MessageRole.SYSTEM, content="You are terse."),
    ChatMessage(role=MessageRole.DEVELOPER, content="Metric units."),
    ChatMessage(
        role=MessageRole.USER,
        blocks=[
            TextBlock(text="Weather here?"),
            ImageBlock(url="https://example.com/oslo.jpg", image_mimetype="image/jpeg"),
        ],
    ),
    ChatMessage(role=MessageRole.ASSISTANT, blocks=[], additional_kwargs={"tool_calls": [TOOL_CALL]}),
    ChatMessage(
        role=MessageRole.TOOL, content='{"temp_c": 3}', additional_kwargs={"tool_call_id": "call_1", "name": "weather"}
    ),
    ChatMessage(role=MessageRole.CHATBOT, content="3 °C.", additional_kwargs={"model": "fake"}),
]


def test_is_a_chat_store(store: ChatSessionsChatStore) -> None:
    assert isinstance(store, BaseChatStore)
    assert store.get_messages("nothing") == []
    assert store.delete_messages("nothing") is None
    assert store.delete_message("nothing", 0) is None
    assert store.delete_last_message("nothing") is None


def test_messages_round_trip_through_the_message_fields(store: ChatSessionsChatStore) -> None:
    store.set_messages("li-round", CONVERSATION)
    assert store.get_messages("li-round") == CONVERSATION
    stored = list(store.client.iter_messages("li-round"))
    assert [m.role.value for m in stored] == ["system", "developer", "user", "assistant", "tool", "assistant"]
    assert stored[3].content is None
    assert stored[3].tool_calls is not None
    assert stored[3].tool_calls[0].model_dump() == TOOL_CALL
    assert (stored[4].tool_call_id, stored[4].name) == ("call_1", "weather")
    assert stored[5].metadata == {"llamaindex": {"role": "chatbot", "additional_kwargs": {"model": "fake"}}}


def test_add_set_delete(store: ChatSessionsChatStore) -> None:
    for i in range(4):
        store.add_message("li-edit", ChatMessage(role=MessageRole.USER, content=f"m{i}"))
    assert [m.content for m in store.get_messages("li-edit")] == ["m0", "m1", "m2", "m3"]
    removed = store.delete_message("li-edit", 1)
    assert removed is not None
    assert removed.content == "m1"
    assert store.delete_message("li-edit", 9) is None
    last = store.delete_last_message("li-edit")
    assert last is not None
    assert last.content == "m3"
    assert [m.content for m in store.get_messages("li-edit")] == ["m0", "m2"]
    store.set_messages("li-edit", [ChatMessage(role=MessageRole.ASSISTANT, content="fresh")])
    assert [m.content for m in store.get_messages("li-edit")] == ["fresh"]
    assert "li-edit" in store.get_keys()
    gone = store.delete_messages("li-edit")
    assert gone is not None
    assert [m.content for m in gone] == ["fresh"]
    assert "li-edit" not in store.get_keys()
    assert store.get_messages("li-edit") == []


@pytest.mark.asyncio
async def test_every_async_method(server: RunningServer) -> None:
    async with AsyncChatSessions(server.base_url) as aclient:
        store = ChatSessionsChatStore(async_client=aclient)
        await store.aset_messages("li-async", CONVERSATION)
        assert await store.aget_messages("li-async") == CONVERSATION
        await store.async_add_message("li-async", ChatMessage(role=MessageRole.USER, content="more"))
        removed = await store.adelete_message("li-async", 0)
        assert removed == CONVERSATION[0]
        last = await store.adelete_last_message("li-async")
        assert last is not None
        assert last.content == "more"
        assert await store.aget_messages("li-async") == CONVERSATION[1:]
        assert "li-async" in await store.aget_keys()
        assert await store.adelete_messages("li-async") == CONVERSATION[1:]
        assert "li-async" not in await store.aget_keys()
        assert await store.adelete_messages("li-async") is None
