"""Routes under /v1/sessions/{id}/messages: append, page, read, clear."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

from chatsessions.api.deps import (
    IdempotencyKeyHeader,
    IfMatchDep,
    IfMatchHeader,
    JSONRoute,
    RepositoryDep,
    TenantDep,
    get_repository,
    get_tenant,
    parse_if_match,
    run_idempotent,
)
from chatsessions.api.limits import check_messages
from chatsessions.api.problems import problem_responses
from chatsessions.api.sessions import SessionIdPath, session_location
from chatsessions.config import Settings
from chatsessions.models import (
    IdempotencyRequest,
    Message,
    MessageBatch,
    MessageBatchCreate,
    MessageCreate,
    MessagePage,
    MessageQuery,
    Order,
    Renderer,
    Session,
    StoredResponse,
)

SeqQuery = Annotated[int | None, Query(ge=0, le=2**62)]


def render_message(session: Session, messages: list[Message]) -> StoredResponse:
    (message,) = messages
    headers = {"Location": f"{session_location(session.id)}/messages/{message.seq}", "ETag": session.etag}
    return StoredResponse(201, message.model_dump_json().encode(), headers)


def render_batch(session: Session, messages: list[Message]) -> StoredResponse:
    return StoredResponse(201, MessageBatch(items=messages).model_dump_json().encode(), {"ETag": session.etag})


def build_messages_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1/sessions/{session_id}/messages", tags=["messages"], route_class=JSONRoute)
    append_errors = problem_responses(400, 404, 409, 412, 413, 415, 422, 503, 507)

    async def append(
        request: Request,
        repository: RepositoryDep,
        tenant: TenantDep,
        session_id: str,
        messages: list[MessageCreate],
        if_match: IfMatchDep,
        idempotency_key: str | None,
        renderer: Renderer,
    ) -> Response:
        async def action(idempotency: IdempotencyRequest | None) -> StoredResponse:
            session, added = await repository.append_messages(
                tenant, session_id, messages, if_match=if_match, idempotency=idempotency
            )
            return renderer(session, added)

        return await run_idempotent(
            request=request, repository=repository, tenant=tenant, key=idempotency_key, render=renderer, action=action
        )

    # The two appends are the hot path: they call the dependencies themselves, because
    # FastAPI spends ~50 µs per sub-dependency per request (measured with bench/run.py).
    @router.post("", status_code=201, response_model=Message, responses=append_errors)
    async def append_message(
        request: Request,
        session_id: SessionIdPath,
        message: MessageCreate,
        if_match: IfMatchHeader = None,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response:
        """Append one message."""
        check_messages([message], settings, ("body",))
        repository, tenant = await get_repository(request), await get_tenant(request)
        precondition = await parse_if_match(if_match)
        return await append(
            request, repository, tenant, session_id, [message], precondition, idempotency_key, render_message
        )

    @router.post("/batch", status_code=201, response_model=MessageBatch, responses=append_errors)
    async def append_messages(
        request: Request,
        session_id: SessionIdPath,
        batch: MessageBatchCreate,
        if_match: IfMatchHeader = None,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response:
        """Append up to 100 messages, all or nothing."""
        check_messages(batch.messages, settings, ("body", "messages"))
        repository, tenant = await get_repository(request), await get_tenant(request)
        precondition = await parse_if_match(if_match)
        return await append(
            request, repository, tenant, session_id, batch.messages, precondition, idempotency_key, render_batch
        )

    @router.get("", response_model=MessagePage, responses=problem_responses(404, 422, 503))
    async def list_messages(
        session_id: SessionIdPath,
        repository: RepositoryDep,
        tenant: TenantDep,
        after: Annotated[SeqQuery, Query(description="Only messages with a greater seq.")] = None,
        before: Annotated[SeqQuery, Query(description="Only messages with a smaller seq.")] = None,
        limit: Annotated[int, Query(ge=1, le=settings.max_page_messages)] = min(100, settings.max_page_messages),
        order: Order = Order.asc,
    ) -> Response:
        """Page through the history."""
        items, more = await repository.list_messages(
            tenant, session_id, MessageQuery(after=after, before=before, limit=limit, order=order)
        )
        return Response(MessagePage(items=items, has_more=more).model_dump_json(), media_type="application/json")

    @router.get("/batch", include_in_schema=False)
    async def get_batch() -> Response:
        # Without this, GET .../batch would reach GET .../{seq} and answer 422 for seq "batch".
        raise HTTPException(405, headers={"Allow": "POST"})

    @router.get("/{seq}", response_model=Message, responses=problem_responses(404, 422, 503))
    async def get_message(
        session_id: SessionIdPath,
        seq: Annotated[int, Path(ge=1, le=2**62)],
        repository: RepositoryDep,
        tenant: TenantDep,
    ) -> Response:
        """Read one message."""
        message = await repository.get_message(tenant, session_id, seq)
        return Response(message.model_dump_json(), media_type="application/json")

    @router.delete("", status_code=204, responses=problem_responses(404, 412, 422, 503, 507))
    async def clear_messages(
        session_id: SessionIdPath, repository: RepositoryDep, tenant: TenantDep, if_match: IfMatchDep
    ) -> Response:
        """Clear the history; the session stays."""
        session = await repository.clear_messages(tenant, session_id, if_match=if_match)
        return Response(status_code=204, headers={"ETag": session.etag})

    return router
