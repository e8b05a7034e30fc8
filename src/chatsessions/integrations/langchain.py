"""LangChain chat history on a chatsessions service: `ChatSessionsHistory` (extra `langchain`).

    from chatsessions.integrations.langchain import ChatSessionsHistory

    history = ChatSessionsHistory("session-1", base_url="http://127.0.0.1:8000", api_key="...")
    history.add_messages([HumanMessage("hi"), AIMessage("hello")])   # one batch request
    history.messages                                                   # every message, in order

Each LangChain field lands in the message field that means the same, so other
clients read a tool-calling conversation as it is:

| LangChain                              | chatsessions message                        |
|----------------------------------------|---------------------------------------------|
| HumanMessage / AIMessage / SystemMessage / ToolMessage | role user / assistant / system / tool |
| ChatMessage(role=R), R a chatsessions role (`developer`, ...) | role R                   |
| ChatMessage(role=R), any other R       | role `user`, R in metadata (no equivalent)  |
| FunctionMessage (legacy)               | role `tool`, `name`; kind in metadata       |
| content (string or list of blocks)     | content (string or parts; a bare string block becomes a text part) |
| AIMessage.tool_calls (`args` a dict)   | tool_calls (`arguments` its JSON text)      |
| ToolMessage.tool_call_id               | tool_call_id                                |
| name                                   | name                                        |
| id                                     | id (unique in the session)                  |

What has no equivalent goes under `metadata["langchain"]`: the LangChain class
when the role alone does not say it, a custom ChatMessage role,
`additional_kwargs`, `response_metadata`, `usage_metadata`, `invalid_tool_calls`,
ToolMessage `status` and `artifact`, and an id that is not a valid message id.
Any other metadata of a message is left alone (and not shown to LangChain).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.chat_history import BaseChatMessageHistory
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from chatsessions.client import AsyncChatSessions, ChatSessions
from chatsessions.models import MAX_BATCH, MESSAGE_ID_RE, Message, MessageCreate, Role

LANGCHAIN = "langchain"  # the metadata member holding what has no field of its own
_ROLES = {role.value for role in Role}


class ChatSessionsHistory(BaseChatMessageHistory):
    """The history of one chat session, read and written over HTTP (sync and async).

    Args:
        session_id: the chat session; it is created (PUT, get-or-create) on the first write.
        base_url, api_key: where the service is, and the tenant's key; used to make the
            clients not given.
        client / async_client: clients to use (the caller closes them).
        session_fields: fields of the session when this history creates it (`user_id`, ...).
    """

    def __init__(
        self,
        session_id: str,
        *,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        client: ChatSessions | None = None,
        async_client: AsyncChatSessions | None = None,
        session_fields: dict[str, Any] | None = None,
    ) -> None:
        self.session_id = session_id
        self._client = client
        self._async_client = async_client
        self._base_url, self._api_key = base_url, api_key
        self._session_fields = session_fields or {}
        self._created = False

    @property
    def client(self) -> ChatSessions:
        if self._client is None:
            self._client = ChatSessions(self._base_url, api_key=self._api_key)
        return self._client

    @property
    def async_client(self) -> AsyncChatSessions:
        if self._async_client is None:
            self._async_client = AsyncChatSessions(self._base_url, api_key=self._api_key)
        return self._async_client

    # --- reading ------------------------------------------------------------------

    @property
    def messages(self) -> list[BaseMessage]:  # type: ignore[override]
        if self.client.get_session(self.session_id) is None:
            return []
        return [to_langchain(m) for m in self.client.iter_messages(self.session_id, page_size=1000)]

    async def aget_messages(self) -> list[BaseMessage]:
        if await self.async_client.get_session(self.session_id) is None:
            return []
        return [to_langchain(m) async for m in self.async_client.iter_messages(self.session_id, page_size=1000)]

    # --- writing ------------------------------------------------------------------

    def add_message(self, message: BaseMessage) -> None:
        self.add_messages([message])

    def add_messages(self, messages: Sequence[BaseMessage]) -> None:
        """Append in one batch request (in batches of 100 beyond that; each is all or nothing)."""
        if not messages:
            return
        if not self._created:
            self.client.put_session(self.session_id, **self._session_fields)
            self._created = True
        creates = [from_langchain(m) for m in messages]
        for start in range(0, len(creates), MAX_BATCH):
            self.client.append_messages(self.session_id, creates[start : start + MAX_BATCH])

    async def aadd_messages(self, messages: Sequence[BaseMessage]) -> None:
        if not messages:
            return
        if not self._created:
            await self.async_client.put_session(self.session_id, **self._session_fields)
            self._created = True
        creates = [from_langchain(m) for m in messages]
        for start in range(0, len(creates), MAX_BATCH):
            await self.async_client.append_messages(self.session_id, creates[start : start + MAX_BATCH])

    def clear(self) -> None:
        """Delete every message; the session stays (its seqs are never reused)."""
        if self.client.get_session(self.session_id) is not None:
            self.client.clear_messages(self.session_id)

    async def aclear(self) -> None:
        if await self.async_client.get_session(self.session_id) is not None:
            await self.async_client.clear_messages(self.session_id)


# --- conversions ----------------------------------------------------------------------


def from_langchain(message: BaseMessage) -> MessageCreate:
    """A LangChain message as the message to append (see the module docstring for the mapping)."""
    extra: dict[str, Any] = {}
    fields: dict[str, Any] = {"name": message.name, "content": _content_out(message.content)}
    if isinstance(message, HumanMessage):
        fields["role"] = Role.user
    elif isinstance(message, AIMessage):
        fields["role"] = Role.assistant
        calls = [_call_out(call) for call in message.tool_calls]
        if calls:
            fields["tool_calls"] = calls
            if fields["content"] in ("", []):
                fields["content"] = None  # as OpenAI sends a message that only calls tools
        if message.invalid_tool_calls:
            extra["invalid_tool_calls"] = [dict(call) for call in message.invalid_tool_calls]
        if message.usage_metadata is not None:
            extra["usage_metadata"] = dict(message.usage_metadata)
    elif isinstance(message, SystemMessage):
        fields["role"] = Role.system
    elif isinstance(message, ToolMessage):
        fields["role"] = Role.tool
        fields["tool_call_id"] = message.tool_call_id
        if message.status != "success":
            extra["status"] = message.status
        if message.artifact is not None:
            extra["artifact"] = message.artifact
    elif isinstance(message, FunctionMessage):
        fields["role"] = Role.tool
        extra["type"] = "function"
    elif isinstance(message, ChatMessage):
        extra["type"] = "chat"
        if message.role in _ROLES:
            fields["role"] = Role(message.role)
        else:
            fields["role"] = Role.user
            extra["role"] = message.role
    else:
        raise TypeError(f"cannot store a LangChain message of type {message.type!r}")
    if message.id is not None:
        if MESSAGE_ID_RE.fullmatch(message.id):
            fields["id"] = message.id
        else:
            extra["id"] = message.id
    if message.additional_kwargs:
        extra["additional_kwargs"] = message.additional_kwargs
    if message.response_metadata:
        extra["response_metadata"] = message.response_metadata
    if extra:
        fields["metadata"] = {LANGCHAIN: extra}
    return MessageCreate.model_validate(fields)


def to_langchain(message: Message) -> BaseMessage:
    """A stored message as the LangChain message it was (or the closest one for other clients' messages)."""
    extra: dict[str, Any] = dict((message.metadata or {}).get(LANGCHAIN) or {})  # type: ignore[arg-type]
    common: dict[str, Any] = {
        "content": _content_in(message.content),
        "name": message.name,
        "id": message.id if message.id is not None else extra.get("id"),
        "additional_kwargs": extra.get("additional_kwargs") or {},
        "response_metadata": extra.get("response_metadata") or {},
    }
    kind = extra.get("type")
    if kind == "chat":
        return ChatMessage(role=extra.get("role", message.role.value), **common)
    if kind == "function":
        return FunctionMessage(**{**common, "name": message.name or ""})
    if message.role is Role.user:
        return HumanMessage(**common)
    if message.role is Role.system:
        return SystemMessage(**common)
    if message.role is Role.developer:
        return ChatMessage(role="developer", **common)
    if message.role is Role.tool:
        tool: dict[str, Any] = {"tool_call_id": message.tool_call_id or "", "status": extra.get("status", "success")}
        if "artifact" in extra:
            tool["artifact"] = extra["artifact"]
        return ToolMessage(**common, **tool)
    calls, invalid = [], list(extra.get("invalid_tool_calls") or [])
    for call in message.tool_calls or []:
        try:
            args = json.loads(call.function.arguments)
        except ValueError:
            args = None
        if isinstance(args, dict):
            calls.append({"name": call.function.name, "args": args, "id": call.id or None, "type": "tool_call"})
        else:  # not a JSON object: LangChain keeps such a call as invalid, with its text
            invalid.append(
                {
                    "name": call.function.name,
                    "args": call.function.arguments,
                    "id": call.id or None,
                    "error": "arguments are not a JSON object",
                    "type": "invalid_tool_call",
                }
            )
    return AIMessage(
        **common,
        tool_calls=calls,
        invalid_tool_calls=invalid,
        usage_metadata=extra.get("usage_metadata"),
    )


def _content_out(content: str | list[str | dict[Any, Any]]) -> Any:
    if isinstance(content, str):
        return content
    # A bare string in a list of blocks is a text block.
    return [{"type": "text", "text": block} if isinstance(block, str) else _block_out(block) for block in content]


def _block_out(block: dict[Any, Any]) -> dict[Any, Any]:
    # A LangChain image block given as base64 has no URL: make it a data URL (the image part needs one).
    if block.get("type") == "image" and "url" not in block and "base64" in block:
        data = {key: value for key, value in block.items() if key not in ("base64", "source_type")}
        mime = block.get("mime_type") or "application/octet-stream"
        return {**data, "url": f"data:{mime};base64,{block['base64']}"}
    return block


def _content_in(content: Any) -> str | list[str | dict[Any, Any]]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return [part.model_dump(mode="json") for part in content]


def _call_out(call: Any) -> dict[str, Any]:
    arguments = json.dumps(call["args"], ensure_ascii=False, separators=(",", ":"))
    return {"id": call.get("id") or "", "type": "function", "function": {"name": call["name"], "arguments": arguments}}
