"""Streamed messages: `POST .../messages/{seq}/deltas` and `PATCH .../messages/{seq}`."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from chatsessions.api.deps import IfMatchDep, RepositoryDep, SettingsDep, TenantDep
from chatsessions.api.idempotency import run_idempotent, stored_to_response
from chatsessions.api.limits import check_content, check_json
from chatsessions.api.params import IdempotencyKeyHeader, SeqPath, SessionIdPath
from chatsessions.api.problems import problem_responses, success_doc
from chatsessions.api.routing import JSONRoute
from chatsessions.config import Settings
from chatsessions.models import IdempotencyRequest, Message, Session, StoredResponse
from chatsessions.streaming import MessageDelta, MessageDeltaAck, MessagePatch


def render_delta(session: Session, messages: list[Message]) -> StoredResponse:
    (message,) = messages
    body = MessageDeltaAck(seq=message.seq, version=session.version).model_dump_json().encode()
    return StoredResponse(200, body, {"ETag": session.etag})


def build_streaming_router(settings: Settings) -> APIRouter:
    router = APIRouter(prefix="/v1/sessions/{session_id}/messages", tags=["messages"], route_class=JSONRoute)

    @router.post(
        "/{seq}/deltas",
        response_model=MessageDeltaAck,
        responses={
            200: success_doc("Appended, durably", "ETag", "Idempotent-Replayed"),
            **problem_responses(400, 404, 409, 412, 413, 415, 422, 503, 507),
        },
    )
    async def append_delta(
        request: Request,
        session_id: SessionIdPath,
        seq: SeqPath,
        delta: MessageDelta,
        repository: RepositoryDep,
        tenant: TenantDep,
        if_match: IfMatchDep,
        idempotency_key: IdempotencyKeyHeader = None,
    ) -> Response:
        """Append text to a streamed message."""

        async def action(idempotency: IdempotencyRequest | None) -> StoredResponse:
            session, message = await repository.append_delta(
                tenant, session_id, seq, delta.content, if_match=if_match, idempotency=idempotency
            )
            return render_delta(session, [message])

        answer = await run_idempotent(
            repository=repository,
            tenant=tenant,
            key=idempotency_key,
            request=(request.method, request.scope["path"], await request.body()),
            render=render_delta,
            action=action,
        )
        return answer.response()

    @router.patch(
        "/{seq}",
        response_model=Message,
        responses={
            200: success_doc("Patched", "ETag"),
            **problem_responses(400, 404, 409, 412, 413, 415, 422, 503, 507),
        },
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/merge-patch+json": {"schema": {"$ref": "#/components/schemas/MessagePatch"}},
                    "application/json": {"schema": {"$ref": "#/components/schemas/MessagePatch"}},
                },
                "required": True,
            }
        },
    )
    async def patch_message(
        session_id: SessionIdPath,
        seq: SeqPath,
        patch: MessagePatch,
        repository: RepositoryDep,
        tenant: TenantDep,
        app_settings: SettingsDep,
        if_match: IfMatchDep,
    ) -> Response:
        """Change or finish a streamed message with a JSON Merge Patch."""
        check_content(patch.content, app_settings, ("body", "content"))
        for name in ("metadata", "references"):
            check_json(getattr(patch, name), app_settings, ("body", name))
        changes = patch.model_dump(mode="json", exclude_unset=True)
        session, message = await repository.update_message(tenant, session_id, seq, changes, if_match=if_match)
        return stored_to_response(StoredResponse(200, message.model_dump_json().encode(), {"ETag": session.etag}))

    return router
