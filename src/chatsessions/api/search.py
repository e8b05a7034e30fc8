"""`GET /v1/search`: full-text search of the tenant's messages."""

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
from chatsessions.models import Role, SearchFilter, SearchPage
from chatsessions.text import SearchQuery

# Deeper than this, a search is no longer a search but a scan: narrow the query instead.
MAX_OFFSET = 10_000


def build_search_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["search"], route_class=JSONRoute)

    @router.get("/v1/search", response_model=SearchPage, responses=problem_responses(422, 503))
    async def search_messages(
        repository: RepositoryDep,
        tenant: TenantDep,
        q: Annotated[
            str,
            Query(
                min_length=1,
                max_length=256,
                description='Words (all must match, case- and accent-insensitive) and "quoted phrases".',
            ),
        ],
        user_id: FilterQuery = None,
        document_id: FilterQuery = None,
        section_id: FilterQuery = None,
        role: Role | None = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
        cursor: CursorQuery = None,
    ) -> Response:
        """Search messages, best match first."""
        query = SearchQuery.parse(q)
        offset = 0
        if cursor is not None:
            (offset,) = decode_cursor(cursor, length=1)
            if not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
                raise InvalidInput("cursor is not one this service issued", loc=("query", "cursor"))
        filters = SearchFilter(user_id=user_id, document_id=document_id, section_id=section_id, role=role)
        result = await repository.search(tenant, query, filters=filters, limit=limit, offset=offset)
        next_offset = result.next_offset
        next_cursor = encode_cursor([next_offset]) if next_offset is not None and next_offset <= MAX_OFFSET else None
        page = SearchPage(items=result.items, next_cursor=next_cursor)
        return Response(page.model_dump_json(), media_type="application/json")

    return router
