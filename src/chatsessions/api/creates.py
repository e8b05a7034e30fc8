"""`POST /v1/sessions` on a `LeanRoute`: creating a session costs no more than an append.

As for the appends (`api.appends`), `create_session` below is an ordinary FastAPI
signature that the OpenAPI operation comes from and that a plain `JSONRoute`
serves in the tests as the reference; `CreateHandler` reads the same inputs by
hand, in FastAPI's order: the media type (415), the body as strict JSON (400),
the `Idempotency-Key` header and the body together (one 422), the limits (422),
then the store (409 for an id that exists; replays under a key).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Body
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError
from starlette.types import Receive, Scope, Send

from chatsessions.api.appends import NO_BODY, parse_body, read_body, validation_issues
from chatsessions.api.idempotency import run_idempotent
from chatsessions.api.limits import check_session_fields
from chatsessions.api.params import IdempotencyKey, IdempotencyKeyHeader
from chatsessions.api.problems import problem_responses, success_doc
from chatsessions.api.routing import LeanRoute
from chatsessions.api.sessions import render_created
from chatsessions.config import Settings
from chatsessions.models import DEFAULT_TENANT, IdempotencyRequest, Session, SessionCreate, StoredResponse
from chatsessions.storage.base import SessionRepository

_BODY: TypeAdapter[SessionCreate | None] = TypeAdapter(SessionCreate | None)
_IDEMPOTENCY_KEY: TypeAdapter[str] = TypeAdapter(IdempotencyKey)


async def create_session(
    idempotency_key: IdempotencyKeyHeader = None,
    body: Annotated[SessionCreate | None, Body()] = None,
) -> Session:
    """Create a session."""
    raise NotImplementedError("served by CreateHandler")


async def serve_create(scope: Scope, receive: Receive, send: Send) -> None:
    """Plain ASGI: serves `create_session`; errors are raised to the app's exception handlers."""
    content_type: bytes | None = None
    raw_key: bytes | None = None
    for name, value in scope["headers"]:  # the first of each, as FastAPI's Header() reads it
        if name == b"content-type" and content_type is None:
            content_type = value
        elif name == b"idempotency-key" and raw_key is None:
            raw_key = value
    body = await read_body(receive)
    value = parse_body(body, content_type.decode("latin-1") if content_type is not None else None)

    issues: list[dict[str, Any]] = []
    key: str | None = None
    if raw_key is not None:
        try:
            key = _IDEMPOTENCY_KEY.validate_python(raw_key.decode("latin-1"))
        except ValidationError as exc:
            issues += validation_issues(exc, "header", "idempotency-key")
    data: SessionCreate | None = None
    if value is not NO_BODY:
        try:
            data = _BODY.validate_python(value, from_attributes=True)  # as FastAPI validates
        except ValidationError as exc:
            issues += validation_issues(exc, "body")
    if issues:
        raise RequestValidationError(issues, body=None if value is NO_BODY else value)

    state = scope["state"]
    settings: Settings = state["settings"]
    wanted = data or SessionCreate()
    check_session_fields(wanted, settings)
    repository: SessionRepository = state["repository"]
    tenant: str = state.get("tenant", DEFAULT_TENANT)

    async def action(idempotency: IdempotencyRequest | None) -> StoredResponse:
        return render_created(await repository.create_session(tenant, wanted, idempotency=idempotency), [])

    answer = await run_idempotent(
        repository=repository,
        tenant=tenant,
        key=key,
        request=(scope["method"], scope["path"], body),
        render=render_created,
        action=action,
    )
    await answer.send(send)


def create_routes() -> list[LeanRoute]:
    """The create route; register it on the app's router before the sessions router."""
    return [
        LeanRoute(
            "/v1/sessions",
            create_session,
            serve=serve_create,
            methods=["POST"],
            status_code=201,
            tags=["sessions"],
            response_model=Session,
            responses={
                201: success_doc("Created", "Location", "ETag", "Idempotent-Replayed"),
                **problem_responses(400, 409, 413, 415, 422, 503, 507),
            },
        )
    ]
