"""`AsyncChatSessions`: the typed client on `httpx.AsyncClient` (`sync.py` is the same, blocking)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from chatsessions.client import _calls, live
from chatsessions.client._calls import IfMatch, MessageInput, RetryPolicy
from chatsessions.models import (
    CitationPage,
    Message,
    MessagePage,
    Order,
    Role,
    SearchHit,
    SearchPage,
    Session,
    SessionCreate,
    SessionPage,
    SessionPatch,
    SessionPut,
)

T = TypeVar("T")


class AsyncChatSessions:
    """A chatsessions service, one method per operation; errors are `chatsessions.client.errors`.

    Args:
        base_url: where the service answers, e.g. `http://127.0.0.1:8000`.
        api_key: sent as `Authorization: Bearer <key>` (the tenant's key), when given.
        timeout: seconds for each try of a request.
        retry: how connection errors and 502/503/504/507 answers are retried (`RetryPolicy`).
        http: an `httpx.AsyncClient` to use instead of one of our own (its base URL is kept;
            the caller closes it).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout)
        self._headers = headers
        self._retry = retry or RetryPolicy()

    async def __aenter__(self) -> AsyncChatSessions:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _send(self, call: _calls.Call[T]) -> T:
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    headers={**self._headers, **call.headers},
                )
            except httpx.TransportError as exc:
                delay = _calls.retry_delay(call, self._retry, attempt, error=exc)
                if delay is None:
                    raise _calls.unreachable(exc, attempt + 1) from exc
            else:
                delay = _calls.retry_delay(call, self._retry, attempt, response=response)
                if delay is None:
                    return call.result(response)
            await asyncio.sleep(delay)
            attempt += 1

    # --- sessions -----------------------------------------------------------------

    async def create_session(
        self,
        data: SessionCreate | Mapping[str, Any] | None = None,
        /,
        *,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Session:
        """Create a session (`id`, `user_id`, `title`, `settings`, ... as keywords); Conflict if the id exists."""
        return await self._send(_calls.create_session(data, fields, idempotency_key))

    async def put_session(
        self, session_id: str, data: SessionPut | Mapping[str, Any] | None = None, /, **fields: Any
    ) -> tuple[Session, bool]:
        """Get or create `session_id` atomically: the session, and whether this call created it."""
        return await self._send(_calls.put_session(session_id, data, fields))

    async def get_session(self, session_id: str) -> Session | None:
        """The session, or None when there is none."""
        return await self._send(_calls.get_session(session_id))

    async def list_sessions(
        self,
        *,
        user_id: str | None = None,
        document_id: str | None = None,
        section_id: str | None = None,
        cited_doc_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SessionPage:
        """One page of sessions, newest `updated_at` first; pass `next_cursor` on for the next."""
        return await self._send(
            _calls.list_sessions(
                user_id=user_id,
                document_id=document_id,
                section_id=section_id,
                cited_doc_id=cited_doc_id,
                limit=limit,
                cursor=cursor,
            )
        )

    async def iter_sessions(
        self,
        *,
        user_id: str | None = None,
        document_id: str | None = None,
        section_id: str | None = None,
        cited_doc_id: str | None = None,
        page_size: int = 100,
    ) -> AsyncIterator[Session]:
        """Every session that matches, page after page."""
        cursor: str | None = None
        while True:
            page = await self.list_sessions(
                user_id=user_id,
                document_id=document_id,
                section_id=section_id,
                cited_doc_id=cited_doc_id,
                limit=page_size,
                cursor=cursor,
            )
            for session in page.items:
                yield session
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def patch_session(
        self,
        session_id: str,
        patch: SessionPatch | Mapping[str, Any] | None = None,
        /,
        *,
        if_match: IfMatch = None,
        **fields: Any,
    ) -> Session:
        """JSON Merge Patch of the session (`None` removes a member); PreconditionFailed on a stale `if_match`."""
        return await self._send(_calls.patch_session(session_id, patch, fields, if_match))

    async def delete_session(self, session_id: str, *, if_match: IfMatch = None) -> None:
        """Delete the session and its messages; NotFound if there is none."""
        await self._send(_calls.delete_session(session_id, if_match))

    # --- live: change feeds and streamed messages (chatsessions.client.live) ---------------

    def follow_session(
        self, session_id: str, *, last_event_id: str | None = None
    ) -> AsyncGenerator[live.FeedEvent, None]:
        """The session's change events, resuming by itself after a drop; ends after `session.deleted`.

        `last_event_id`: resume after that event ("0": from the session's creation); None: live only.
        NotFound (raised when iterating starts) if there is no such session.
        """
        return live.follow(
            self._http,
            f"{_calls._session_path(session_id)}/events",
            headers=self._headers,
            params={},
            last_event_id=last_event_id,
            ends_with="session.deleted",
            retry=self._retry,
        )

    def follow_events(
        self, *, last_event_id: str | None = None, **filters: str | None
    ) -> AsyncGenerator[live.FeedEvent, None]:
        """Every change event of the tenant (filters `user_id`, `document_id`, `section_id`), resuming by itself."""
        params = {k: v for k, v in filters.items() if v is not None}
        return live.follow(
            self._http,
            "/v1/events",
            headers=self._headers,
            params=params,
            last_event_id=last_event_id,
            ends_with=None,
            retry=self._retry,
        )

    def stream_message(
        self, session_id: str, *, role: Role | str = Role.assistant, content: str = "", **fields: Any
    ) -> live.MessageStream:
        """`async with chats.stream_message(sid) as m: await m.write(text)`: completed on exit, incomplete on error."""
        base = f"{_calls._session_path(session_id)}/messages"

        async def send(method: str, path: str, body: Any, headers: dict[str, str]) -> Any:
            call: _calls.Call[Any] = _calls.Call(method, base + path, lambda r: r.json(), json=body, headers=headers)
            return await self._send(call)

        async def open_message() -> live.StreamedMessage:
            message = await self.append_message(session_id, role=role, content=content, status="in_progress", **fields)
            return live.StreamedMessage(message, send)

        return live.MessageStream(open_message)

    # --- messages -----------------------------------------------------------------

    async def append_message(
        self,
        session_id: str,
        message: MessageInput | None = None,
        /,
        *,
        if_match: IfMatch = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Message:
        """Append one message (a MessageCreate, a mapping, or its fields as keywords)."""
        return await self._send(_calls.append_message(session_id, message, fields, if_match, idempotency_key))

    async def append_messages(
        self,
        session_id: str,
        messages: Sequence[MessageInput],
        *,
        if_match: IfMatch = None,
        idempotency_key: str | None = None,
    ) -> list[Message]:
        """Append 1-100 messages in one request, all or nothing."""
        return await self._send(_calls.append_messages(session_id, messages, if_match, idempotency_key))

    async def list_messages(
        self,
        session_id: str,
        *,
        after: int | None = None,
        before: int | None = None,
        limit: int | None = None,
        order: Order | str | None = None,
    ) -> MessagePage:
        """One page of messages between the seqs `after` and `before` (exclusive)."""
        return await self._send(_calls.list_messages(session_id, after=after, before=before, limit=limit, order=order))

    async def iter_messages(
        self,
        session_id: str,
        *,
        after: int | None = None,
        before: int | None = None,
        order: Order | str = Order.asc,
        page_size: int = 100,
    ) -> AsyncIterator[Message]:
        """Every message of the session in `order`, page after page."""
        direction = Order(order)
        while True:
            page = await self.list_messages(session_id, after=after, before=before, limit=page_size, order=direction)
            for message in page.items:
                yield message
            bounds = _calls.next_message_bounds(page, direction, after, before)
            if bounds is None:
                return
            after, before = bounds

    async def get_message(self, session_id: str, seq: int) -> Message | None:
        """The message at `seq`, or None when there is none (NotFound when the session is missing)."""
        return await self._send(_calls.get_message(session_id, seq))

    async def delete_message(self, session_id: str, seq: int, *, if_match: IfMatch = None) -> None:
        """Delete one message (its seq is never reused); NotFound when there is no such message."""
        await self._send(_calls.delete_message(session_id, seq, if_match))

    async def clear_messages(self, session_id: str, *, if_match: IfMatch = None) -> None:
        """Delete every message, keep the session (its seqs are never reused)."""
        await self._send(_calls.clear_messages(session_id, if_match))

    # --- search and citations ---------------------------------------------------------

    async def search_messages(
        self,
        q: str,
        *,
        user_id: str | None = None,
        document_id: str | None = None,
        section_id: str | None = None,
        role: Role | str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> SearchPage:
        """One page of the tenant's messages that match `q` (words and "quoted phrases"), best first."""
        return await self._send(
            _calls.search_messages(
                q,
                user_id=user_id,
                document_id=document_id,
                section_id=section_id,
                role=role,
                limit=limit,
                cursor=cursor,
            )
        )

    async def iter_search(self, q: str, *, page_size: int = 100, **filters: Any) -> AsyncIterator[SearchHit]:
        """Every hit of `q`, page after page (`filters` as for `search_messages`)."""
        cursor: str | None = None
        while True:
            page = await self.search_messages(q, limit=page_size, cursor=cursor, **filters)
            for hit in page.items:
                yield hit
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def list_citations(
        self,
        doc_id: str,
        *,
        user_id: str | None = None,
        section_id: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> CitationPage:
        """One page of the messages whose references cite `doc_id`, newest first."""
        return await self._send(
            _calls.list_citations(doc_id, user_id=user_id, section_id=section_id, limit=limit, cursor=cursor)
        )
