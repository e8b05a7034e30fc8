"""Streamed messages: the bodies of a delta and of a message PATCH, and how each changes a message.

A message appended with `status: in_progress` streams: deltas append to its
(string) content and a PATCH may change it, until its status becomes
`completed` or `incomplete`; then it is immutable. Both stores apply these
functions inside the change's transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from chatsessions.errors import InvalidInput, MessageNotInProgress
from chatsessions.models import (
    Content,
    JsonObject,
    Message,
    MessageStatus,
    ShortName,
    ToolCalls,
    apply_merge_patch,
    content_text,
)


class MessageDelta(BaseModel):
    """Body of `POST .../messages/{seq}/deltas`: text appended to a streamed message."""

    model_config = ConfigDict(extra="forbid")

    content: str = Field(description="Text appended to the message's content.")


class MessageDeltaAck(BaseModel):
    """The answer to a delta: the message and the session version the delta made."""

    seq: int
    version: int


class MessagePatch(BaseModel):
    """Body of `PATCH .../messages/{seq}`: a JSON Merge Patch of a streamed message."""

    model_config = ConfigDict(extra="forbid")

    status: MessageStatus | None = Field(default=None, description="`completed` or `incomplete` ends the stream.")
    content: Content = None
    metadata: JsonObject | None = None
    references: list[JsonObject] | None = None
    tool_calls: ToolCalls | None = None
    name: ShortName | None = None


def _check_streaming(session_id: str, message: Message) -> None:
    if message.status is not MessageStatus.in_progress:
        raise MessageNotInProgress(session_id, message.seq, message.status.value)


def _content_bytes(content: Any) -> int:
    return len(content_text(content).encode("utf-8", "surrogatepass"))


def apply_delta(session_id: str, message: Message, delta: str, *, now: datetime, max_content_bytes: int) -> Message:
    """The message with `delta` appended; MessageNotInProgress, or InvalidInput past the content limit."""
    _check_streaming(session_id, message)
    if not isinstance(message.content, str):
        raise InvalidInput("a delta appends to string content; this message has content parts", loc=("body", "content"))
    content = message.content + delta
    if len(content) * 4 > max_content_bytes and _content_bytes(content) > max_content_bytes:
        raise InvalidInput(f"content would be larger than {max_content_bytes} bytes", loc=("body", "content"))
    return message.model_copy(update={"content": content, "updated_at": now})


def apply_patch(
    session_id: str, message: Message, changes: dict[str, Any], *, now: datetime, max_content_bytes: int
) -> Message:
    """The message after a merge patch (`changes`: the fields the client set, as JSON)."""
    _check_streaming(session_id, message)
    current = message.model_dump(mode="json")
    for field, value in changes.items():
        if field in ("metadata",) and value is not None and current.get(field) is not None:
            current[field] = apply_merge_patch(current[field], value)
        elif field == "status" and value is None:
            raise InvalidInput("status cannot be null", loc=("body", "status"))
        else:
            current[field] = value
    current["updated_at"] = now
    patched = Message.model_validate(current)
    if _content_bytes(patched.content) > max_content_bytes:
        raise InvalidInput(f"content is larger than {max_content_bytes} bytes", loc=("body", "content"))
    return patched


def expired(session_id: str, message: Message, *, now: datetime) -> Message:
    """An abandoned streamed message, marked incomplete."""
    _check_streaming(session_id, message)
    return message.model_copy(update={"status": MessageStatus.incomplete, "updated_at": now})
