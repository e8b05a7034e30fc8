"""The hot path: `POST /v1/sessions/{id}/messages` and `.../messages/batch` as plain ASGI.

FastAPI resolves every parameter of a route through its dependency machinery,
wraps each request in exit stacks and, since 0.16x, re-matches the routes of
included routers through a context layer; Starlette adds a Request and two
send wrappers per request. For an append that costs more than the store does
(`make bench` shows the ceiling), so `AppendLane`, the innermost of our
middlewares (after authentication and the body limit), serves these two
operations itself and passes every other request on. It reads the same inputs
by hand: the same body models, the same header and path rules, in FastAPI's
order, and renders errors through `api.problems.problem_for`, the function the
app's exception handlers use, so an error looks the same on every route. The
OpenAPI operations come from `documented_routes`: signatures that describe
these endpoints and are never routed.

What an append checks, in order: the media type (415), the body as strict
JSON (400), then path, headers and body together (one 422 listing every
issue), then the configured limits (422), then `If-Match` (412) and
`Idempotency-Key` (replay, 409, 422) in the store.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from chatsessions.api.auth import route_path
from chatsessions.api.deps import (
    Answer,
    IdempotencyKey,
    IdempotencyKeyHeader,
    IfMatchHeader,
    JSONRoute,
    check_json_media,
    parse_if_match,
    parse_strict_json,
    run_idempotent,
)
from chatsessions.api.limits import check_messages
from chatsessions.api.problems import problem_for, problem_responses
from chatsessions.api.sessions import SessionIdPath, session_location
from chatsessions.config import Settings
from chatsessions.models import (
    DEFAULT_TENANT,
    SESSION_ID_RE,
    IdempotencyRequest,
    Message,
    MessageBatch,
    MessageBatchCreate,
    MessageCreate,
    Renderer,
    Session,
    SessionId,
    StoredResponse,
)
from chatsessions.storage.base import SessionRepository

MESSAGES_PATH = "/v1/sessions/{session_id}/messages"
BATCH_PATH = MESSAGES_PATH + "/batch"
APPEND_ERRORS = problem_responses(400, 404, 409, 412, 413, 415, 422, 503, 507)

_SESSION_ID: TypeAdapter[str] = TypeAdapter(SessionId)
_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(IdempotencyKey)


def render_message(session: Session, messages: list[Message]) -> StoredResponse:
    (message,) = messages
    headers = {"Location": f"{session_location(session.id)}/messages/{message.seq}", "ETag": session.etag}
    return StoredResponse(201, message.model_dump_json().encode(), headers)


def render_batch(session: Session, messages: list[Message]) -> StoredResponse:
    return StoredResponse(201, MessageBatch(items=messages).model_dump_json().encode(), {"ETag": session.etag})


@dataclass(frozen=True, slots=True)
class AppendKind:
    """What differs between the single and the batch append."""

    body: type[BaseModel]
    messages: Callable[[Any], list[MessageCreate]]
    loc: tuple[str, ...]
    render: Renderer


SINGLE = AppendKind(MessageCreate, lambda body: [body], ("body",), render_message)
BATCH = AppendKind(MessageBatchCreate, lambda body: body.messages, ("body", "messages"), render_batch)


def _issues(exc: ValidationError, *loc: str) -> list[dict[str, Any]]:
    return [{**issue, "loc": (*loc, *issue["loc"])} for issue in exc.errors(include_url=False)]


async def read_body(receive: Receive) -> bytes:
    """The whole request body (the body-limit middleware stops it at the limit).

    Starlette's `Request(scope, receive).body()` does the same for ~6 µs more an append.
    """
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPException(400, "the client disconnected before the body was complete")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


NO_BODY: Any = object()  # not None: a body of JSON `null` is a value, and fails validation as one


def parse_body(body: bytes, content_type: str | None) -> Any:
    """The JSON value of the body, or NO_BODY for an empty one; 415 and 400 as JSONRoute answers them."""
    check_json_media(content_type, body)
    if not body:
        return NO_BODY
    try:
        return parse_strict_json(body)
    except json.JSONDecodeError as exc:
        issue = {"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([{**issue, "ctx": {"error": exc.msg}}], body=exc.doc) from exc


_APPEND_PATH = re.compile(r"/v1/sessions/(?P<session_id>[^/]+)/messages(?P<batch>/batch)?")


class AppendLane:
    """Pure ASGI middleware: answers the two appends, passes everything else to `app`."""

    def __init__(self, app: ASGIApp, *, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = _APPEND_PATH.fullmatch(route_path(scope))
        if match is None:
            await self.app(scope, receive, send)
            return
        try:
            answer = await self.append(scope, receive, match["session_id"], BATCH if match["batch"] else SINGLE)
        except Exception as exc:
            problem = problem_for(exc)
            if problem is None:
                raise  # a bug: ServerErrorMiddleware logs it and answers 500
            await problem(scope, receive, send)
            return
        await answer.send(send)

    async def append(self, scope: Scope, receive: Receive, session_id: str, kind: AppendKind) -> Answer:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in (b"content-type", b"if-match", b"idempotency-key"):
                headers.setdefault(name, value)  # the first of each, as FastAPI's Header() reads it
        body = await read_body(receive)
        raw_type = headers.get(b"content-type")
        value = parse_body(body, raw_type.decode("latin-1") if raw_type is not None else None)

        issues: list[dict[str, Any]] = []
        if SESSION_ID_RE.fullmatch(session_id) is None:
            try:
                _SESSION_ID.validate_python(session_id)  # for FastAPI's error, word for word
            except ValidationError as exc:
                issues += _issues(exc, "path", "session_id")
        key: str | None = None
        if (raw_key := headers.get(b"idempotency-key")) is not None:
            try:
                key = _IDEMPOTENCY_KEY.validate_python(raw_key.decode("latin-1"))
            except ValidationError as exc:
                issues += _issues(exc, "header", "idempotency-key")
        parsed: Any = None
        if value is NO_BODY:
            issues.append({"type": "missing", "loc": ("body",), "msg": "Field required", "input": None})
        else:
            try:
                parsed = kind.body.model_validate(value, from_attributes=True)  # as FastAPI validates
            except ValidationError as exc:
                issues += _issues(exc, "body")
        if issues:
            raise RequestValidationError(issues, body=None if value is NO_BODY else value)

        messages = kind.messages(parsed)
        check_messages(messages, self.settings, kind.loc)
        raw_if_match = headers.get(b"if-match")
        if_match = await parse_if_match(raw_if_match.decode("latin-1") if raw_if_match is not None else None)
        state = scope["state"]
        repository: SessionRepository = state["repository"]
        tenant: str = state.get("tenant", DEFAULT_TENANT)
        render = kind.render

        async def action(idempotency: IdempotencyRequest | None) -> StoredResponse:
            session, added = await repository.append_messages(
                tenant, session_id, messages, if_match=if_match, idempotency=idempotency
            )
            return render(session, added)

        return await run_idempotent(
            repository=repository,
            tenant=tenant,
            key=key,
            request=(scope["method"], scope["path"], body),
            render=render,
            action=action,
        )


def install_appends(app: FastAPI, settings: Settings) -> list[APIRoute]:
    """Serve the two appends in `AppendLane`; return their documented operations.

    Call it before adding the other middlewares: the lane must sit inside them.
    """
    app.add_middleware(AppendLane, settings=settings)
    return documented_routes()


def documented_routes() -> list[APIRoute]:
    """The OpenAPI operations of the two appends; `AppendLane` serves them."""

    def append_message(
        session_id: SessionIdPath,
        message: MessageCreate,
        if_match: IfMatchHeader = None,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> None:
        """Append one message."""

    def append_messages(
        session_id: SessionIdPath,
        batch: MessageBatchCreate,
        if_match: IfMatchHeader = None,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> None:
        """Append up to 100 messages, all or nothing."""

    common: dict[str, Any] = {"methods": ["POST"], "status_code": 201, "tags": ["messages"], "responses": APPEND_ERRORS}
    # JSONRoute, as every route with a body: routed in a test app, these answer bad input as the lane does.
    return [
        JSONRoute(MESSAGES_PATH, append_message, response_model=Message, **common),
        JSONRoute(BATCH_PATH, append_messages, response_model=MessageBatch, **common),
    ]
