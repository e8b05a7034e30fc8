"""Routes under /v1/sessions that act on sessions as a whole."""

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Body, Query
from starlette.responses import Response

from chatsessions.api.deps import IfMatchDep, RepositoryDep, SettingsDep, TenantDep
from chatsessions.api.idempotency import stored_to_response
from chatsessions.api.limits import check_session_fields
from chatsessions.api.params import CursorQuery, FilterQuery, SessionIdPath
from chatsessions.api.problems import problem_responses, success_doc
from chatsessions.api.routing import JSONRoute
from chatsessions.config import Settings
from chatsessions.errors import InvalidInput, SessionNotFound
from chatsessions.models import (
    DeletedCount,
    Message,
    Session,
    SessionCreate,
    SessionCursor,
    SessionFilter,
    SessionPage,
    SessionPatch,
    SessionPut,
    StoredResponse,
)


def session_location(session_id: str) -> str:
    return f"/v1/sessions/{session_id}"


def render_session(session: Session, status: int, *, location: bool) -> StoredResponse:
    headers = {"ETag": session.etag}
    if location:
        headers["Location"] = session_location(session.id)
    return StoredResponse(status, session.model_dump_json().encode(), headers)


def render_created(session: Session, _messages: list[Message]) -> StoredResponse:
    return render_session(session, 201, location=True)


def encode_cursor(cursor: SessionCursor) -> str:
    raw = json.dumps([cursor.updated_at.isoformat(), cursor.id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str) -> SessionCursor:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        updated_at, session_id = json.loads(raw)
        moment = datetime.fromisoformat(updated_at)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return SessionCursor(moment, str(session_id))
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor is not one this service issued", loc=("query", "cursor")) from exc


def build_sessions_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1/sessions", tags=["sessions"], route_class=JSONRoute)

    @router.put(
        "/{session_id}",
        response_model=Session,
        responses={
            200: success_doc("The session as it was", "ETag"),
            201: success_doc("Created", "Location", "ETag", model=Session),
            **problem_responses(400, 413, 415, 422, 503, 507),
        },
    )
    async def put_session(
        session_id: SessionIdPath,
        repository: RepositoryDep,
        tenant: TenantDep,
        settings: SettingsDep,
        body: Annotated[SessionPut | None, Body()] = None,
    ) -> Response:
        """Get or create a session, atomically."""
        data = SessionCreate.model_validate(body, from_attributes=True) if body is not None else SessionCreate()
        check_session_fields(data, settings)
        session, created = await repository.get_or_create_session(tenant, session_id, data)
        return stored_to_response(render_session(session, 201 if created else 200, location=created))

    @router.get(
        "/{session_id}",
        response_model=Session,
        responses={200: success_doc("The session", "ETag"), **problem_responses(404, 422, 503)},
    )
    async def get_session(session_id: SessionIdPath, repository: RepositoryDep, tenant: TenantDep) -> Response:
        """Read one session."""
        session = await repository.get_session(tenant, session_id)
        if session is None:
            raise SessionNotFound(session_id)
        return stored_to_response(render_session(session, 200, location=False))

    @router.get("", response_model=SessionPage, responses=problem_responses(422, 503))
    async def list_sessions(
        repository: RepositoryDep,
        tenant: TenantDep,
        user_id: FilterQuery = None,
        document_id: FilterQuery = None,
        section_id: FilterQuery = None,
        cited_doc_id: Annotated[
            str | None, Query(max_length=1024, description="Only sessions with a message that cites this doc_id.")
        ] = None,
        pinned: Annotated[bool | None, Query(description="Only pinned (true) or unpinned (false) sessions.")] = None,
        limit: Annotated[int, Query(ge=1, le=settings.max_page_sessions)] = min(20, settings.max_page_sessions),
        cursor: CursorQuery = None,
    ) -> SessionPage:
        """List sessions, newest `updated_at` first."""
        listing = await repository.list_sessions(
            tenant,
            filters=SessionFilter(
                user_id=user_id,
                document_id=document_id,
                section_id=section_id,
                cited_doc_id=cited_doc_id,
                pinned=pinned,
            ),
            limit=limit,
            cursor=decode_cursor(cursor) if cursor else None,
        )
        next_cursor = encode_cursor(listing.next_cursor) if listing.next_cursor else None
        return SessionPage(items=listing.items, next_cursor=next_cursor)

    @router.patch(
        "/{session_id}",
        response_model=Session,
        responses={200: success_doc("Patched", "ETag"), **problem_responses(400, 404, 412, 413, 415, 422, 503, 507)},
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/merge-patch+json": {"schema": {"$ref": "#/components/schemas/SessionPatch"}},
                    "application/json": {"schema": {"$ref": "#/components/schemas/SessionPatch"}},
                },
                "required": True,
            }
        },
    )
    async def patch_session(
        session_id: SessionIdPath,
        patch: SessionPatch,
        repository: RepositoryDep,
        tenant: TenantDep,
        settings: SettingsDep,
        if_match: IfMatchDep,
    ) -> Response:
        """Change session fields with a JSON Merge Patch."""
        check_session_fields(patch, settings)
        session = await repository.patch_session(tenant, session_id, patch, if_match=if_match)
        return stored_to_response(render_session(session, 200, location=False))

    @router.delete("/{session_id}", status_code=204, responses=problem_responses(404, 412, 422, 503, 507))
    async def delete_session(
        session_id: SessionIdPath, repository: RepositoryDep, tenant: TenantDep, if_match: IfMatchDep
    ) -> Response:
        """Delete a session and its messages."""
        await repository.delete_session(tenant, session_id, if_match=if_match)
        return Response(status_code=204)

    @router.delete("", response_model=DeletedCount, responses=problem_responses(422, 503, 507))
    async def delete_user_sessions(
        repository: RepositoryDep,
        tenant: TenantDep,
        user_id: Annotated[str, Query(max_length=1024, description="Whose sessions to erase (required).")],
        document_id: FilterQuery = None,
    ) -> DeletedCount:
        """Erase every session of a user (optionally only those of one document)."""
        deleted = await repository.delete_sessions(tenant, user_id=user_id, document_id=document_id)
        return DeletedCount(deleted=deleted)

    return router
