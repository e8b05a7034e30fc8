"""The change feeds: `GET /v1/sessions/{id}/events` and `GET /v1/events` (Server-Sent Events).

How a feed never loses nor repeats an event: it subscribes to the broker
first, then reads the recorded events after the client's position, then
drains its buffer skipping what the replay already sent. Everything committed
before the replay's snapshot is in the replay; everything published after the
subscription is in the buffer; the overlap is skipped by position. The 200
headers go out only once the subscription is in place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import WithJsonSchema
from pydantic_core import to_json
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask
from starlette.responses import Response

from chatsessions import events as ev
from chatsessions.api.cursors import decode_cursor, encode_cursor
from chatsessions.api.deps import RepositoryDep, TenantDep
from chatsessions.api.params import FilterQuery, SessionIdPath
from chatsessions.api.problems import problem_response, problem_responses
from chatsessions.api.routing import JSONRoute
from chatsessions.config import Settings
from chatsessions.errors import InvalidInput, SessionNotFound
from chatsessions.models import Session
from chatsessions.storage.base import SessionRepository

REPLAY_PAGE = 500  # recorded events read per query while replaying
RECONNECT_MS = 1000  # `retry:` sent first: how soon EventSource reconnects after a drop

# The pattern documents what a position looks like; a value outside it is answered by the
# handler (400 for a session feed, `reset` for the tenant feed), not by validation.
VersionHeader = Annotated[
    str | None,
    WithJsonSchema({"type": "string", "pattern": r"^[0-9]{1,18}$"}),
    Header(
        alias="Last-Event-ID",
        max_length=2048,
        description="The `id:` of the last event received: resume after it (wins over `after`).",
    ),
]
VersionQuery = Annotated[
    str | None,
    WithJsonSchema({"type": "string", "pattern": r"^[0-9]{1,18}$"}),
    Query(max_length=2048, description="Resume after this event id (as `Last-Event-ID`)."),
]
CursorHeader = Annotated[
    str | None,
    WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9_-]+$"}),
    Header(
        alias="Last-Event-ID",
        max_length=2048,
        description="The `id:` of the last event received: resume after it (wins over `after`).",
    ),
]
CursorQuery = Annotated[
    str | None,
    WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9_-]+$"}),
    Query(max_length=2048, description="Resume after this event id (as `Last-Event-ID`)."),
]

_STREAM_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A stream of Server-Sent Events (`text/event-stream`), live until the client leaves.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


async def get_broker(request: Request) -> ev.Broker:
    return cast(ev.Broker, request.state.broker)


BrokerDep = Annotated[ev.Broker, Depends(get_broker)]


def _sse(event: ev.ChangeEvent, position: str) -> ServerSentEvent:
    return ServerSentEvent(data=event.data, event=event.type, id=position)


def _session_reset(session: Session) -> ServerSentEvent:
    data = {"session_id": session.id, "version": session.version, "session": session.model_dump(mode="json")}
    return ServerSentEvent(data=to_json(data).decode(), event=ev.RESET, id=str(session.version))


def tenant_cursor(event_id: int) -> str:
    """The opaque `id:` of a tenant-feed event."""
    return encode_cursor(["e", event_id])


def parse_tenant_cursor(token: str) -> int | None:
    """The event id a cursor names, or None for anything this service did not issue."""
    try:
        kind, event_id = decode_cursor(token, length=2)
    except InvalidInput:
        return None
    if kind != "e" or not isinstance(event_id, int) or isinstance(event_id, bool) or event_id < 0:
        return None
    return event_id


def _parse_version(token: str) -> int | None:
    return int(token) if token.isascii() and token.isdigit() and len(token) <= 18 else None


async def _session_stream(
    repository: SessionRepository,
    subscription: ev.Subscription,
    tenant: str,
    session_id: str,
    *,
    after: int | None,
    first: ev.SessionReplay | None,
) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(retry=RECONNECT_MS)
    last = after
    if after is not None:
        replay = first
        while True:
            if replay is None:
                replay = await repository.read_session_events(tenant, session_id, after=last or 0, limit=REPLAY_PAGE)
            if replay.session is None:
                break  # deleted meanwhile: its deletion event is in the buffer
            if not replay.replayable:
                yield _session_reset(replay.session)
                last = replay.session.version
                break
            for event in replay.events:
                yield _sse(event, str(event.version))
                last = event.version
            if len(replay.events) < REPLAY_PAGE:
                break
            replay = None
    while True:
        batch = await subscription.next_batch()
        if not batch:
            return  # the buffer overflowed: the client resumes from its last id
        for event in batch:
            if last is not None and event.version <= last:
                continue
            yield _sse(event, str(event.version))
            last = event.version
            if event.type == ev.SESSION_DELETED:
                return


async def _tenant_stream(
    repository: SessionRepository,
    subscription: ev.Subscription,
    tenant: str,
    *,
    after: int | None,
    filters: ev.TenantFilter,
) -> AsyncIterator[ServerSentEvent]:
    yield ServerSentEvent(retry=RECONNECT_MS)
    if after is None:
        replay = await repository.read_tenant_events(tenant, after=None, filters=filters, limit=0)
        last = replay.head
    else:
        last = after
        while True:
            replay = await repository.read_tenant_events(tenant, after=last, filters=filters, limit=REPLAY_PAGE)
            if not replay.replayable:
                yield ServerSentEvent(data="{}", event=ev.RESET, id=tenant_cursor(replay.head))
                last = replay.head
                break
            for event in replay.events:
                yield _sse(event, tenant_cursor(event.id))
                last = event.id
            if len(replay.events) < REPLAY_PAGE:
                last = max(last, replay.head)  # the snapshot held every event up to its head
                break
    while True:
        batch = await subscription.next_batch()
        if not batch:
            return
        for event in batch:
            if event.id <= last:
                continue
            yield _sse(event, tenant_cursor(event.id))
            last = event.id


def build_events_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["events"], route_class=JSONRoute)
    heartbeat = settings.events_heartbeat_seconds

    def respond(stream: AsyncIterator[ServerSentEvent], broker: ev.Broker, sub: ev.Subscription) -> Response:
        return EventSourceResponse(
            stream, ping=heartbeat, background=BackgroundTask(broker.unsubscribe, sub), send_timeout=None
        )

    @router.get(
        "/sessions/{session_id}/events",
        response_class=EventSourceResponse,
        responses={**_STREAM_DOC, **problem_responses(400, 404, 422, 503)},
    )
    async def follow_session(
        session_id: SessionIdPath,
        repository: RepositoryDep,
        tenant: TenantDep,
        broker: BrokerDep,
        last_event_id: VersionHeader = None,
        after: VersionQuery = None,
    ) -> Response:
        """Follow one session's changes as Server-Sent Events."""
        token = last_event_id if last_event_id is not None else after
        position = None if token is None else _parse_version(token.strip())
        if token is not None and position is None:
            return problem_response(
                400, "Last-Event-ID (or after) is not an event id of this feed", kind="bad-event-id"
            )
        subscription = broker.subscribe(tenant, session_id=session_id)
        try:
            # The first read happens before the 200: a missing session is a 404, a failing store a 503.
            if position is None:
                first = None
                if await repository.get_session(tenant, session_id) is None:
                    raise SessionNotFound(session_id)
            else:
                first = await repository.read_session_events(tenant, session_id, after=position, limit=REPLAY_PAGE)
                if first.session is None:
                    raise SessionNotFound(session_id)
        except BaseException:
            broker.unsubscribe(subscription)
            raise
        stream = _session_stream(repository, subscription, tenant, session_id, after=position, first=first)
        return respond(stream, broker, subscription)

    @router.get(
        "/events",
        response_class=EventSourceResponse,
        responses={**_STREAM_DOC, **problem_responses(422, 503)},
    )
    async def follow_tenant(
        repository: RepositoryDep,
        tenant: TenantDep,
        broker: BrokerDep,
        user_id: FilterQuery = None,
        document_id: FilterQuery = None,
        section_id: FilterQuery = None,
        last_event_id: CursorHeader = None,
        after: CursorQuery = None,
    ) -> Response:
        """Follow every session of the tenant as Server-Sent Events (ids are opaque cursors)."""
        token = last_event_id if last_event_id is not None else after
        # An id this service never issued cannot be replayed: -1 makes the stream start with `reset`.
        cursor = None if token is None else parse_tenant_cursor(token.strip())
        position = None if token is None else (-1 if cursor is None else cursor)
        filters = ev.TenantFilter(user_id=user_id, document_id=document_id, section_id=section_id)
        subscription = broker.subscribe(tenant, filters=filters)
        stream = _tenant_stream(repository, subscription, tenant, after=position, filters=filters)
        return respond(stream, broker, subscription)

    return router
