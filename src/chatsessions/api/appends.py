"""The hot path: `POST /v1/sessions/{id}/messages` and `.../messages/batch` on `LeanRoute`s.

The endpoints below are ordinary FastAPI signatures: the OpenAPI operations come
from them, and a plain `JSONRoute` serving them is what the lean handlers are
tested against. The routes serve them with `AppendHandler`, a plain ASGI callable
that reads the same inputs by hand, in FastAPI's order, with the same models and
rules, and raises the same errors to the app's exception handlers. It skips what
an append does not need from FastAPI: dependency resolution, the exit stacks, a
`Request` and a `Response` per call.

What an append checks, in order: the media type (415), the body as strict
JSON (400), then path, headers and body together (one 422 listing every
issue), then the configured limits (422), then `If-Match` (412) and
`Idempotency-Key` (replay, 409, 422) in the store.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from chatsessions.api.idempotency import run_idempotent
from chatsessions.api.limits import check_messages
from chatsessions.api.params import (
    IdempotencyKey,
    IdempotencyKeyHeader,
    IfMatch,
    IfMatchHeader,
    SessionIdPath,
    parse_if_match,
)
from chatsessions.api.problems import problem_responses, success_doc
from chatsessions.api.routing import LeanRoute, check_json_media, parse_strict_json
from chatsessions.api.sessions import session_location
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
_IF_MATCH: TypeAdapter[str] = TypeAdapter(IfMatch)


def render_message(session: Session, messages: list[Message]) -> StoredResponse:
    (message,) = messages
    headers = {"Location": f"{session_location(session.id)}/messages/{message.seq}", "ETag": session.etag}
    return StoredResponse(201, message.model_dump_json().encode(), headers)


def render_batch(session: Session, messages: list[Message]) -> StoredResponse:
    return StoredResponse(201, MessageBatch(items=messages).model_dump_json().encode(), {"ETag": session.etag})


async def append_message(
    session_id: SessionIdPath,
    message: MessageCreate,
    if_match: IfMatchHeader = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Message:
    """Append one message."""
    raise NotImplementedError("served by AppendHandler")


async def append_messages(
    session_id: SessionIdPath,
    batch: MessageBatchCreate,
    if_match: IfMatchHeader = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> MessageBatch:
    """Append up to 100 messages, all or nothing."""
    raise NotImplementedError("served by AppendHandler")


def validation_issues(exc: ValidationError, *loc: str) -> list[dict[str, Any]]:
    """FastAPI's issues of a failed validation, under `loc`."""
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


@dataclass(frozen=True, slots=True)
class AppendHandler:
    """Plain ASGI: serves one of the two appends; errors are raised to the app's exception handlers."""

    body: type[BaseModel]
    messages: Callable[[Any], list[MessageCreate]]
    loc: tuple[str, ...]
    render: Renderer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in (b"content-type", b"if-match", b"idempotency-key"):
                headers.setdefault(name, value)  # the first of each, as FastAPI's Header() reads it
        body = await read_body(receive)
        raw_type = headers.get(b"content-type")
        value = parse_body(body, raw_type.decode("latin-1") if raw_type is not None else None)

        session_id: str = scope["path_params"]["session_id"]
        issues: list[dict[str, Any]] = []
        if SESSION_ID_RE.fullmatch(session_id) is None:
            try:
                _SESSION_ID.validate_python(session_id)  # for FastAPI's error, word for word
            except ValidationError as exc:
                issues += validation_issues(exc, "path", "session_id")
        if_match: str | None = None
        if (raw_if_match := headers.get(b"if-match")) is not None:
            try:
                if_match = _IF_MATCH.validate_python(raw_if_match.decode("latin-1"))
            except ValidationError as exc:
                issues += validation_issues(exc, "header", "if-match")
        key: str | None = None
        if (raw_key := headers.get(b"idempotency-key")) is not None:
            try:
                key = _IDEMPOTENCY_KEY.validate_python(raw_key.decode("latin-1"))
            except ValidationError as exc:
                issues += validation_issues(exc, "header", "idempotency-key")
        parsed: Any = None
        if value is NO_BODY:
            issues.append({"type": "missing", "loc": ("body",), "msg": "Field required", "input": None})
        else:
            try:
                parsed = self.body.model_validate(value, from_attributes=True)  # as FastAPI validates
            except ValidationError as exc:
                issues += validation_issues(exc, "body")
        if issues:
            raise RequestValidationError(issues, body=None if value is NO_BODY else value)

        state = scope["state"]
        settings: Settings = state["settings"]
        messages = self.messages(parsed)
        check_messages(messages, settings, self.loc)
        precondition = await parse_if_match(if_match)
        repository: SessionRepository = state["repository"]
        tenant: str = state.get("tenant", DEFAULT_TENANT)
        render = self.render

        async def action(idempotency: IdempotencyRequest | None) -> StoredResponse:
            session, added = await repository.append_messages(
                tenant, session_id, messages, if_match=precondition, idempotency=idempotency
            )
            return render(session, added)

        answer = await run_idempotent(
            repository=repository,
            tenant=tenant,
            key=key,
            request=(scope["method"], scope["path"], body),
            render=render,
            action=action,
        )
        await answer.send(send)


def append_routes() -> list[LeanRoute]:
    """The two append routes; register them on the app's router before the others (matching is in order)."""
    common: dict[str, Any] = {"methods": ["POST"], "status_code": 201, "tags": ["messages"]}
    return [
        LeanRoute(
            MESSAGES_PATH,
            append_message,
            serve=AppendHandler(MessageCreate, lambda body: [body], ("body",), render_message),
            response_model=Message,
            responses={201: success_doc("Appended", "Location", "ETag", "Idempotent-Replayed"), **APPEND_ERRORS},
            **common,
        ),
        LeanRoute(
            BATCH_PATH,
            append_messages,
            serve=AppendHandler(MessageBatchCreate, lambda body: body.messages, ("body", "messages"), render_batch),
            owns_path=True,
            response_model=MessageBatch,
            responses={201: success_doc("Appended", "ETag", "Idempotent-Replayed"), **APPEND_ERRORS},
            **common,
        ),
    ]
