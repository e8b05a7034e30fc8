"""`GET /v1/export` and `POST /v1/import`: a tenant's sessions as NDJSON, streamed both ways."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import Response, StreamingResponse

from chatsessions.api.deps import RepositoryDep, SettingsDep, TenantDep
from chatsessions.api.params import FilterQuery
from chatsessions.api.problems import problem_response, problem_responses
from chatsessions.api.routing import JSONRoute
from chatsessions.models import SESSION_ID_PATTERN, ExportFilter, ImportSummary
from chatsessions.transfer import ImportLineError, export_chunks, import_lines

NDJSON = "application/x-ndjson"
IMPORT_PATH = "/v1/import"
# An import streams up to CHATSESSIONS_MAX_IMPORT_BYTES while it writes: its body has an hour.
IMPORT_BODY_TIMEOUT_SECONDS = 3600.0


def build_transfer_router() -> APIRouter:
    router = APIRouter(tags=["transfer"], route_class=JSONRoute)

    @router.get(
        "/v1/export",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "NDJSON: a header line, then each session line followed by its message lines.",
                "content": {NDJSON: {"schema": {"type": "string"}}},
            },
            **problem_responses(422, 503),
        },
    )
    async def export_sessions(
        repository: RepositoryDep,
        tenant: TenantDep,
        user_id: FilterQuery = None,
        document_id: FilterQuery = None,
        session_id: Annotated[str | None, Query(pattern=SESSION_ID_PATTERN)] = None,
    ) -> StreamingResponse:
        """Export sessions and their messages as NDJSON, streamed."""
        filters = ExportFilter(user_id=user_id, document_id=document_id, session_id=session_id)
        return StreamingResponse(export_chunks(repository, tenant, filters), media_type=NDJSON)

    body_doc: dict[str, Any] = {
        "requestBody": {"content": {NDJSON: {"schema": {"type": "string"}}}, "required": True},
    }

    @router.post(
        IMPORT_PATH,
        response_model=ImportSummary,
        responses=problem_responses(400, 413, 422, 503, 507),
        openapi_extra=body_doc,
    )
    async def import_sessions(
        request: Request,
        repository: RepositoryDep,
        tenant: TenantDep,
        settings: SettingsDep,
        on_conflict: Annotated[str, Query(pattern="^(skip|replace)$")] = "skip",
    ) -> Response:
        """Import NDJSON as `GET /v1/export` writes it; each session atomically."""
        try:
            summary = await import_lines(
                repository,
                tenant,
                request.stream(),
                replace=on_conflict == "replace",
                max_line_bytes=settings.max_body_bytes,
            )
        except ImportLineError as exc:
            done = exc.summary
            detail = (
                f"line {exc.line}: {exc.reason}; imported before it: {done.sessions} sessions, {done.messages} messages"
            )
            return problem_response(400, detail, kind="import-line-invalid")
        return Response(summary.model_dump_json(), media_type="application/json")

    return router
