"""`GET /v1/citations`: which messages cited a document."""

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.responses import Response

from chatsessions.api.cursors import decode_cursor, encode_cursor
from chatsessions.api.deps import RepositoryDep, TenantDep
from chatsessions.api.params import CursorQuery, FilterQuery
from chatsessions.api.problems import problem_responses
from chatsessions.api.routing import JSONRoute
from chatsessions.config import Settings
from chatsessions.errors import InvalidInput
from chatsessions.models import CitationCursor, CitationFilter, CitationPage


def _encode(cursor: CitationCursor) -> str:
    return encode_cursor([cursor.created_at.isoformat(), cursor.session_id, cursor.seq, cursor.ordinal])


def _decode(token: str) -> CitationCursor:
    at, session_id, seq, ordinal = decode_cursor(token, length=4)
    try:
        moment = datetime.fromisoformat(at).astimezone(UTC)
        valid = isinstance(session_id, str) and isinstance(seq, int) and isinstance(ordinal, int)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise InvalidInput("cursor is not one this service issued", loc=("query", "cursor"))
    return CitationCursor(moment, session_id, seq, ordinal)


def build_citations_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["search"], route_class=JSONRoute)

    @router.get("/v1/citations", response_model=CitationPage, responses=problem_responses(422, 503))
    async def list_citations(
        repository: RepositoryDep,
        tenant: TenantDep,
        doc_id: Annotated[str, Query(min_length=1, max_length=1024, description="The cited document's `doc_id`.")],
        user_id: FilterQuery = None,
        section_id: FilterQuery = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: CursorQuery = None,
    ) -> Response:
        """List the references to a document, newest first."""
        listing = await repository.list_citations(
            tenant,
            doc_id,
            filters=CitationFilter(user_id=user_id, section_id=section_id),
            limit=limit,
            cursor=_decode(cursor) if cursor else None,
        )
        next_cursor = _encode(listing.next_cursor) if listing.next_cursor else None
        page = CitationPage(items=listing.items, next_cursor=next_cursor)
        return Response(page.model_dump_json(), media_type="application/json")

    return router
