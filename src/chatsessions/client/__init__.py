"""The typed client of chatsessions: `ChatSessions` (blocking) and `AsyncChatSessions`, on httpx.

Requests and answers are the service's own pydantic models (`chatsessions.models`),
errors are the tree of `chatsessions.client.errors`, and retries follow a `RetryPolicy`.

    from chatsessions.client import ChatSessions

    with ChatSessions("http://127.0.0.1:8000", api_key="...") as chats:
        session = chats.create_session(user_id="u1", title="Support")
        chats.append_message(session.id, role="user", content="Hello")
        for message in chats.iter_messages(session.id):
            print(message.seq, message.role, message.content)
"""

from chatsessions.client._calls import NO_RETRIES, IfMatch, MessageInput, RetryPolicy
from chatsessions.client.aio import AsyncChatSessions
from chatsessions.client.errors import (
    ChatSessionsError,
    Conflict,
    NotFound,
    PreconditionFailed,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)
from chatsessions.client.sync import ChatSessions

__all__ = [
    "NO_RETRIES",
    "AsyncChatSessions",
    "ChatSessions",
    "ChatSessionsError",
    "Conflict",
    "IfMatch",
    "MessageInput",
    "NotFound",
    "PreconditionFailed",
    "RetryPolicy",
    "Unauthorized",
    "Unavailable",
    "ValidationFailed",
]
