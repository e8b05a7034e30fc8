"""Routes under /v1/sessions/{id}/messages: page, read, clear (the appends are in `api.appends`)."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import Response

from chatsessions.api.deps import IfMatchDep, RepositoryDep, TenantDep
from chatsessions.api.params import SeqPath, SeqQuery, SessionIdPath
from chatsessions.api.problems import problem_responses, success_doc
from chatsessions.api.routing import JSONRoute
from chatsessions.config import Settings
from chatsessions.models import Message, MessagePage, MessageQuery, Order

# A page may hold megabytes (CHATSESSIONS_MAX_PAGE_BYTES): serialising it in one call would hold
# the event loop (and every append waiting on it) for tens of milliseconds.
_YIELD_EVERY_BYTES = 256 * 1024


async def render_page(items: list[Message], more: bool) -> bytes:
    """`MessagePage(items=items, has_more=more).model_dump_json()`, byte for byte, letting the loop run
    between messages once every `_YIELD_EVERY_BYTES`."""
    parts: list[bytes] = []
    pending = 0
    for message in items:
        part = message.model_dump_json().encode()
        parts.append(part)
        pending += len(part)
        if pending >= _YIELD_EVERY_BYTES:
            pending = 0
            await asyncio.sleep(0)
    return b'{"items":[' + b",".join(parts) + b'],"has_more":' + (b"true" if more else b"false") + b"}"


def build_messages_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1/sessions/{session_id}/messages", tags=["messages"], route_class=JSONRoute)

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
        return Response(await render_page(items, more), media_type="application/json")

    @router.get("/{seq}", response_model=Message, responses=problem_responses(404, 422, 503))
    async def get_message(
        session_id: SessionIdPath,
        seq: SeqPath,
        repository: RepositoryDep,
        tenant: TenantDep,
    ) -> Response:
        """Read one message."""
        message = await repository.get_message(tenant, session_id, seq)
        return Response(message.model_dump_json(), media_type="application/json")

    @router.delete(
        "/{seq}",
        status_code=204,
        responses={204: success_doc("Deleted", "ETag"), **problem_responses(404, 412, 422, 503, 507)},
    )
    async def delete_message(
        session_id: SessionIdPath, seq: SeqPath, repository: RepositoryDep, tenant: TenantDep, if_match: IfMatchDep
    ) -> Response:
        """Delete one message; its seq is never reused."""
        session = await repository.delete_message(tenant, session_id, seq, if_match=if_match)
        return Response(status_code=204, headers={"ETag": session.etag})

    @router.delete(
        "",
        status_code=204,
        responses={204: success_doc("Cleared", "ETag"), **problem_responses(404, 412, 422, 503, 507)},
    )
    async def clear_messages(
        session_id: SessionIdPath, repository: RepositoryDep, tenant: TenantDep, if_match: IfMatchDep
    ) -> Response:
        """Clear the history; the session stays."""
        session = await repository.clear_messages(tenant, session_id, if_match=if_match)
        return Response(status_code=204, headers={"ETag": session.etag})

    return router
