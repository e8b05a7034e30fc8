"""The live parts of the async client: the change feeds as async iterators, and streamed messages.

`follow` keeps a feed open for as long as the caller iterates: after a dropped
connection (or the service cutting off a reader that fell behind) it reconnects
by itself with `Last-Event-ID`, so the caller sees every event once, in order.

    async with AsyncChatSessions(url) as chats:
        async with chats.stream_message(session.id, role="assistant") as m:
            async for token in llm():
                await m.write(token)        # completed on exit, incomplete on an exception
        async for event in chats.follow_session(session.id, last_event_id="0"):
            print(event.id, event.type, event.data)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from chatsessions.client._calls import RetryPolicy, new_idempotency_key
from chatsessions.client.errors import ChatSessionsError, error_for, retry_after
from chatsessions.models import Message, MessageStatus

# How long to wait before reconnecting when the service gave no `retry:` (seconds).
DEFAULT_RECONNECT = 1.0


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One change event: `id` is the position to resume after, `data` its parsed JSON."""

    id: str
    type: str
    data: dict[str, Any]


async def follow(
    http: httpx.AsyncClient,
    path: str,
    *,
    headers: dict[str, str],
    params: dict[str, str],
    last_event_id: str | None,
    ends_with: str | None,
    retry: RetryPolicy,
) -> AsyncGenerator[FeedEvent, None]:
    """Events of the feed at `path`, resuming by itself; stops after an `ends_with` event.

    Raises the client's errors for an answer that is not a stream (404 NotFound...);
    a 503 (too many streams) and a lost connection are retried without end.
    """
    position = last_event_id
    reconnect = DEFAULT_RECONNECT
    failures = 0
    while True:
        sent = dict(headers)
        if position is not None:
            sent["Last-Event-ID"] = position
        try:
            async with aconnect_sse(http, "GET", path, headers=sent, params=params, timeout=None) as source:
                response = source.response
                if response.status_code != 200:
                    await response.aread()
                    if response.status_code not in (502, 503, 504):
                        raise error_for(response)
                    await asyncio.sleep(retry_after(response) or retry.delay(failures, None))
                    failures += 1
                    continue
                failures = 0
                async for sse in source.aiter_sse():
                    if sse.retry is not None:
                        reconnect = sse.retry / 1000
                    if not sse.data:
                        continue  # only `retry:`: nothing to dispatch
                    position = sse.id or position
                    event = FeedEvent(sse.id, sse.event, json.loads(sse.data))
                    yield event
                    if ends_with is not None and event.type == ends_with:
                        return
        except (httpx.TransportError, SSEError):
            pass  # dropped: reconnect from the last id
        await asyncio.sleep(reconnect)


class StreamedMessage:
    """A message being streamed; `write` appends a delta, durably, once (each delta has its own key)."""

    def __init__(self, message: Message, send: Callable[[str, str, Any, dict[str, str]], Awaitable[Any]]) -> None:
        self.message = message
        self._send = send
        self.content = message.content if isinstance(message.content, str) else ""
        self.version: int | None = None

    @property
    def seq(self) -> int:
        return self.message.seq

    async def write(self, delta: str) -> None:
        """Append `delta` to the message; returns once the service stored it."""
        if not delta:
            return
        answer = await self._send(
            "POST", f"/{self.seq}/deltas", {"content": delta}, {"Idempotency-Key": new_idempotency_key()}
        )
        self.content += delta
        self.version = int(answer["version"])

    async def finish(self, status: MessageStatus = MessageStatus.completed, **fields: Any) -> Message:
        """End the stream (`completed` or `incomplete`), with any other fields to set."""
        body = {"status": status.value, **fields}
        answer = await self._send("PATCH", f"/{self.seq}", body, {})
        self.message = Message.model_validate(answer)
        return self.message


class MessageStream:
    """`async with client.stream_message(...) as m`: opens the message, finishes it on exit."""

    def __init__(self, open_message: Callable[[], Awaitable[StreamedMessage]]) -> None:
        self._open = open_message
        self._streamed: StreamedMessage | None = None

    async def __aenter__(self) -> StreamedMessage:
        self._streamed = await self._open()
        return self._streamed

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._streamed is not None
        if exc is None:
            await self._streamed.finish(MessageStatus.completed)
            return
        # The original exception matters more; should this fail too, the idle timeout ends the message.
        with contextlib.suppress(ChatSessionsError):
            await self._streamed.finish(MessageStatus.incomplete)
