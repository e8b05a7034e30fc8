"""`ChatSessionsHistory` against a real server (uvicorn, SQLite store), sync and async.

langchain-core ships no history test suite (its tests of InMemoryChatMessageHistory
stay in its repository, and langchain-tests has none for histories): the first
tests here are their equivalent, then every message type and field round trip,
then RunnableWithMessageHistory over langchain-core's fake chat model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("langchain_core")

from langchain_core._api.deprecation import LangChainDeprecationWarning
from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables.history import RunnableWithMessageHistory

from chatsessions.client import AsyncChatSessions, ChatSessions
from chatsessions.integrations.langchain import ChatSessionsHistory
from tests.server.proc import RunningServer, free_port, running_server, server_env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(server_env(CHATSESSIONS_DATA_DIR=tmp_path_factory.mktemp("langchain")), free_port()) as up:
        yield up


@pytest.fixture
def requests() -> list[str]:
    return []


@pytest.fixture
def client(server: RunningServer, requests: list[str]) -> Iterator[ChatSessions]:
    def log(request: httpx.Request) -> None:
        requests.append(f"{request.method} {request.url.path}")

    with httpx.Client(base_url=server.base_url, event_hooks={"request": [log]}) as http:
        yield ChatSessions(http=http)


def history(client: ChatSessions, session_id: str) -> ChatSessionsHistory:
    return ChatSessionsHistory(session_id, client=client)


CONVERSATION: list[BaseMessage] = [
    SystemMessage("You are terse.", id="sys-1"),
    ChatMessage(role="developer", content="Prefer metric units."),
    HumanMessage(
        content=[
            {"type": "text", "text": "Weather where this was taken?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/oslo.jpg"}},
            {"type": "image", "url": "https://example.com/2.png", "mime_type": "image/png"},
        ],
        name="ada",
        id="human-1",
    ),
    AIMessage(
        content="",
        tool_calls=[
            {"name": "weather", "args": {"city": "Oslo", "units": ["c"]}, "id": "call_1", "type": "tool_call"},
            {"name": "clock", "args": {}, "id": "call_2", "type": "tool_call"},
        ],
        id="ai-1",
        usage_metadata={"input_tokens": 10, "output_tokens": 3, "total_tokens": 13},
        response_metadata={"model_name": "fake"},
        additional_kwargs={"refusal": None},
    ),
    ToolMessage(content='{"temp_c": 3}', tool_call_id="call_1", name="weather"),
    ToolMessage(content="no clock", tool_call_id="call_2", status="error", artifact={"code": 7}),
    AIMessage(content="3 °C in Oslo.", name="helper"),
    ChatMessage(role="critic", content="Too terse."),
    FunctionMessage(name="legacy_fn", content="42"),
    HumanMessage(content="thanks", id="not a valid message id!"),
]


def test_add_and_read_as_the_base_class_promises(client: ChatSessions) -> None:
    h = history(client, "basic")
    assert isinstance(h, BaseChatMessageHistory)
    assert h.messages == []
    h.add_user_message("hello")
    h.add_ai_message(AIMessage("hi there"))
    h.add_messages([HumanMessage("a"), AIMessage("b")])
    assert [(m.type, m.content) for m in h.messages] == [
        ("human", "hello"),
        ("ai", "hi there"),
        ("human", "a"),
        ("ai", "b"),
    ]
    h.clear()
    assert h.messages == []
    h.add_user_message("after clear")
    assert [m.content for m in h.messages] == ["after clear"]
    assert str(h) == "Human: after clear"


def test_clear_of_a_history_never_written_is_a_no_op(client: ChatSessions) -> None:
    h = history(client, "never-written")
    h.clear()
    assert h.messages == []


def test_add_messages_is_one_batch_request(client: ChatSessions, requests: list[str]) -> None:
    h = history(client, "one-batch")
    h.add_messages([HumanMessage("a")])  # the first write also creates the session (PUT)
    requests.clear()
    h.add_messages([HumanMessage(str(i)) for i in range(50)])
    assert requests == ["POST /v1/sessions/one-batch/messages/batch"]


def test_every_message_type_and_field_round_trips(client: ChatSessions) -> None:
    h = history(client, "round-trip")
    h.add_messages(CONVERSATION)
    assert h.messages == CONVERSATION


def test_fields_land_in_the_message_fields_other_clients_read(client: ChatSessions) -> None:
    history(client, "fields").add_messages(CONVERSATION)
    stored = list(client.iter_messages("fields"))
    assert [m.role.value for m in stored] == [
        "system",
        "developer",
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
        "user",
        "tool",
        "user",
    ]
    call = stored[3]
    assert call.content is None
    assert call.tool_calls is not None
    assert [c.model_dump() for c in call.tool_calls] == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Oslo","units":["c"]}'},
        },
        {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": "{}"}},
    ]
    assert (stored[4].tool_call_id, stored[4].name) == ("call_1", "weather")
    assert (stored[2].id, stored[2].name) == ("human-1", "ada")
    assert isinstance(stored[2].content, list)
    assert stored[2].content[0].model_dump() == {"type": "text", "text": "Weather where this was taken?"}
    assert stored[7].metadata == {"langchain": {"type": "chat", "role": "critic"}}  # no role of ours is a critic
    assert stored[1].metadata == {"langchain": {"type": "chat"}}
    assert stored[0].metadata is None  # nothing LangChain-only to keep
    assert stored[9].id is None  # not a valid message id: kept in metadata instead


def test_messages_of_other_clients_read_as_langchain_messages(client: ChatSessions) -> None:
    client.create_session(id="openai")
    client.append_messages(
        "openai",
        [
            {"role": "developer", "content": "be brief"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}],
            },
            {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "ok"}]},
        ],
    )
    developer, ai, tool = history(client, "openai").messages
    assert isinstance(developer, ChatMessage)
    assert developer.role == "developer"
    assert isinstance(ai, AIMessage)
    assert ai.tool_calls == []
    assert ai.invalid_tool_calls[0]["args"] == "[1]"  # not a JSON object: LangChain calls it invalid
    assert isinstance(tool, ToolMessage)
    assert (tool.tool_call_id, tool.content) == ("c", [{"type": "text", "text": "ok"}])


@pytest.mark.asyncio
async def test_the_async_methods(server: RunningServer) -> None:
    async with AsyncChatSessions(server.base_url) as aclient:
        h = ChatSessionsHistory("async", async_client=aclient)
        assert await h.aget_messages() == []
        await h.aadd_messages(CONVERSATION[:4])
        await h.aadd_messages(CONVERSATION[4:])
        assert await h.aget_messages() == CONVERSATION
        await h.aclear()
        assert await h.aget_messages() == []


def test_three_turns_through_runnable_with_message_history(client: ChatSessions) -> None:
    replies = [AIMessage("Hi Ada.", id="r1"), AIMessage("It is 3 °C.", id="r2"), AIMessage("Bye.", id="r3")]
    model = FakeMessagesListChatModel(responses=replies)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are terse."), MessagesPlaceholder("history"), ("human", "{question}")]
    )
    seen: list[int] = []

    def remember(inputs: Any) -> Any:
        seen.append(len(inputs.to_messages()))
        return inputs

    # Deprecated in langchain-core 1.x in favour of LangGraph's persistence, and still what
    # LangChain apps use with a BaseChatMessageHistory.
    with pytest.warns(LangChainDeprecationWarning):
        chain = RunnableWithMessageHistory(
            prompt | remember | model,
            lambda session_id: history(client, session_id),
            input_messages_key="question",
            history_messages_key="history",
        )
    config: Any = {"configurable": {"session_id": "three-turns"}}
    for question in ("I am Ada.", "Weather?", "Thanks."):
        chain.invoke({"question": question}, config=config)
    assert seen == [2, 4, 6]  # the prompt saw the history grow by one exchange a turn
    stored = history(client, "three-turns").messages
    assert [(m.type, m.content) for m in stored] == [
        ("human", "I am Ada."),
        ("ai", "Hi Ada."),
        ("human", "Weather?"),
        ("ai", "It is 3 °C."),
        ("human", "Thanks."),
        ("ai", "Bye."),
    ]
    assert [m.id for m in stored if m.type == "ai"] == ["r1", "r2", "r3"]
