"""LlamaIndex chat store on a chatsessions service: `ChatSessionsChatStore` (extra `llamaindex`).

    from chatsessions.integrations.llamaindex import ChatSessionsChatStore

    store = ChatSessionsChatStore(base_url="http://127.0.0.1:8000", api_key="...")
    store.add_message("session-1", ChatMessage(role="user", content="hi"))
    store.get_messages("session-1")

A key is a session id; `get_keys` lists the tenant's sessions. Roles map one to
one (`function` becomes `tool`, `chatbot` and `model` become `assistant`, the
LlamaIndex role kept in metadata); text blocks are the content (one block: a
string; several: text parts), an image block with a URL is an image part, any
other block is a part of type `llamaindex.<block_type>` holding the block as
LlamaIndex dumps it. `additional_kwargs["tool_calls"]` (OpenAI's shape, as
LlamaIndex's OpenAI integration keeps them), `tool_call_id` and `name` are the
message's own fields; other `additional_kwargs` go under `metadata["llamaindex"]`.

`delete_message(key, idx)` deletes the idx-th message of the history by its seq
(guarded by the session version it read, so a concurrent change is a
PreconditionFailed rather than the wrong message gone).
"""

from __future__ import annotations

from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.core.storage.chat_store.base import BaseChatStore
from pydantic import PrivateAttr

from chatsessions.client import AsyncChatSessions, ChatSessions
from chatsessions.models import MAX_BATCH, Message, MessageCreate, Role

LLAMAINDEX = "llamaindex"  # the metadata member holding what has no field of its own
_BLOCK_PART = "llamaindex."
_ROLE_OF = {
    MessageRole.SYSTEM: Role.system,
    MessageRole.DEVELOPER: Role.developer,
    MessageRole.USER: Role.user,
    MessageRole.ASSISTANT: Role.assistant,
    MessageRole.TOOL: Role.tool,
    MessageRole.FUNCTION: Role.tool,
    MessageRole.CHATBOT: Role.assistant,
    MessageRole.MODEL: Role.assistant,
}
_OWN_KWARGS = ("tool_calls", "tool_call_id", "name")


class ChatSessionsChatStore(BaseChatStore):
    """Chat histories kept by a chatsessions service, one session a key (sync and async)."""

    base_url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    _client: ChatSessions | None = PrivateAttr(default=None)
    _async_client: AsyncChatSessions | None = PrivateAttr(default=None)

    def __init__(
        self,
        *,
        client: ChatSessions | None = None,
        async_client: AsyncChatSessions | None = None,
        **data: Any,
    ) -> None:
        super().__init__(**data)
        self._client = client
        self._async_client = async_client

    @classmethod
    def class_name(cls) -> str:
        return "ChatSessionsChatStore"

    @property
    def client(self) -> ChatSessions:
        if self._client is None:
            self._client = ChatSessions(self.base_url, api_key=self.api_key)
        return self._client

    @property
    def async_client(self) -> AsyncChatSessions:
        if self._async_client is None:
            self._async_client = AsyncChatSessions(self.base_url, api_key=self.api_key)
        return self._async_client

    # --- sync ---------------------------------------------------------------------

    def set_messages(self, key: str, messages: list[ChatMessage]) -> None:
        session, _ = self.client.put_session(key)
        self.client.clear_messages(key, if_match=session)
        self._append(key, messages)

    def get_messages(self, key: str) -> list[ChatMessage]:
        return [to_llamaindex(m) for m in self._stored(key)]

    def add_message(self, key: str, message: ChatMessage) -> None:
        self.client.put_session(key)
        self.client.append_message(key, from_llamaindex(message))

    def delete_messages(self, key: str) -> list[ChatMessage] | None:
        if self.client.get_session(key) is None:
            return None
        found = self.get_messages(key)
        self.client.delete_session(key)
        return found

    def delete_message(self, key: str, idx: int) -> ChatMessage | None:
        session = self.client.get_session(key)
        if session is None:
            return None
        stored = self._stored(key)
        if not 0 <= idx < len(stored):
            return None
        self.client.delete_message(key, stored[idx].seq, if_match=session)
        return to_llamaindex(stored[idx])

    def delete_last_message(self, key: str) -> ChatMessage | None:
        count = len(self._stored(key))
        return self.delete_message(key, count - 1) if count else None

    def get_keys(self) -> list[str]:
        return [session.id for session in self.client.iter_sessions()]

    def _stored(self, key: str) -> list[Message]:
        if self.client.get_session(key) is None:
            return []
        return list(self.client.iter_messages(key, page_size=1000))

    def _append(self, key: str, messages: list[ChatMessage]) -> None:
        creates = [from_llamaindex(m) for m in messages]
        for start in range(0, len(creates), MAX_BATCH):
            self.client.append_messages(key, creates[start : start + MAX_BATCH])

    # --- async --------------------------------------------------------------------

    async def aset_messages(self, key: str, messages: list[ChatMessage]) -> None:
        session, _ = await self.async_client.put_session(key)
        await self.async_client.clear_messages(key, if_match=session)
        creates = [from_llamaindex(m) for m in messages]
        for start in range(0, len(creates), MAX_BATCH):
            await self.async_client.append_messages(key, creates[start : start + MAX_BATCH])

    async def aget_messages(self, key: str) -> list[ChatMessage]:
        return [to_llamaindex(m) for m in await self._astored(key)]

    async def async_add_message(self, key: str, message: ChatMessage) -> None:
        await self.async_client.put_session(key)
        await self.async_client.append_message(key, from_llamaindex(message))

    async def adelete_messages(self, key: str) -> list[ChatMessage] | None:
        if await self.async_client.get_session(key) is None:
            return None
        found = await self.aget_messages(key)
        await self.async_client.delete_session(key)
        return found

    async def adelete_message(self, key: str, idx: int) -> ChatMessage | None:
        session = await self.async_client.get_session(key)
        if session is None:
            return None
        stored = await self._astored(key)
        if not 0 <= idx < len(stored):
            return None
        await self.async_client.delete_message(key, stored[idx].seq, if_match=session)
        return to_llamaindex(stored[idx])

    async def adelete_last_message(self, key: str) -> ChatMessage | None:
        count = len(await self._astored(key))
        return await self.adelete_message(key, count - 1) if count else None

    async def aget_keys(self) -> list[str]:
        return [session.id async for session in self.async_client.iter_sessions()]

    async def _astored(self, key: str) -> list[Message]:
        if await self.async_client.get_session(key) is None:
            return []
        return [m async for m in self.async_client.iter_messages(key, page_size=1000)]


# --- conversions ----------------------------------------------------------------------


def from_llamaindex(message: ChatMessage) -> MessageCreate:
    """A LlamaIndex message as the message to append (see the module docstring for the mapping)."""
    kwargs = dict(message.additional_kwargs)
    extra: dict[str, Any] = {}
    role = _ROLE_OF[MessageRole(message.role)]
    if role.value != MessageRole(message.role).value:
        extra["role"] = MessageRole(message.role).value
    rest = {key: value for key, value in kwargs.items() if key not in _OWN_KWARGS}
    if rest:
        extra["additional_kwargs"] = rest
    fields: dict[str, Any] = {
        "role": role,
        "content": _content_out(message.blocks),
        "name": kwargs.get("name"),
        "tool_call_id": kwargs.get("tool_call_id"),
        "tool_calls": [_plain(call) for call in kwargs["tool_calls"]] if kwargs.get("tool_calls") else None,
    }
    if fields["content"] is None and not (role is Role.assistant and fields["tool_calls"]):
        fields["content"] = ""  # a message without blocks
    if extra:
        fields["metadata"] = {LLAMAINDEX: extra}
    return MessageCreate.model_validate(fields)


def to_llamaindex(message: Message) -> ChatMessage:
    extra: dict[str, Any] = dict((message.metadata or {}).get(LLAMAINDEX) or {})  # type: ignore[arg-type]
    kwargs: dict[str, Any] = dict(extra.get("additional_kwargs") or {})
    if message.tool_calls:
        kwargs["tool_calls"] = [call.model_dump(mode="json") for call in message.tool_calls]
    if message.tool_call_id is not None:
        kwargs["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        kwargs["name"] = message.name
    role = MessageRole(extra.get("role", message.role.value))
    return ChatMessage(role=role, blocks=_blocks_in(message.content), additional_kwargs=kwargs)


def _plain(call: Any) -> Any:
    # OpenAI SDK objects, as LlamaIndex's OpenAI integration may keep them, have model_dump.
    return call.model_dump(mode="json", exclude_none=True) if hasattr(call, "model_dump") else call


def _content_out(blocks: list[Any]) -> Any:
    if not blocks:
        return None
    if len(blocks) == 1 and isinstance(blocks[0], TextBlock):
        return blocks[0].text
    parts: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock) and block.url is not None and block.image is None:
            part: dict[str, Any] = {"type": "image", "url": str(block.url)}
            if block.image_mimetype is not None:
                part["mime_type"] = block.image_mimetype
            if block.detail is not None:
                part["detail"] = block.detail
            parts.append(part)
        else:
            dumped = block.model_dump(mode="json")
            parts.append({**dumped, "type": _BLOCK_PART + dumped.pop("block_type")})
    return parts


def _blocks_in(content: Any) -> list[Any]:
    if content is None:
        return []
    if isinstance(content, str):
        return [TextBlock(text=content)]
    blocks: list[Any] = []
    for part in content:
        data = part.model_dump(mode="json")
        kind = data.pop("type")
        if kind == "text":
            blocks.append(TextBlock(text=data["text"]))
        elif kind == "image":
            blocks.append(ImageBlock(url=data["url"], image_mimetype=data.get("mime_type"), detail=data.get("detail")))
        elif kind.startswith(_BLOCK_PART):
            blocks.append({**data, "block_type": kind.removeprefix(_BLOCK_PART)})
        else:  # a part another client wrote (a file, OpenAI's image_url, ...): its JSON as text
            blocks.append(TextBlock(text=part.model_dump_json()))
    return blocks
