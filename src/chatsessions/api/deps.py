"""Dependencies as named types, the strict JSON route, and the idempotency wrapper."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, cast

from fastapi import Depends, Header, Request
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import Response

from chatsessions.api.problems import domain_problem
from chatsessions.config import Settings
from chatsessions.errors import ChatSessionsError
from chatsessions.models import DEFAULT_TENANT, IdempotencyRequest, Precondition, Renderer, StoredResponse
from chatsessions.storage.base import SessionRepository


async def get_repository(request: Request) -> SessionRepository:
    return cast(SessionRepository, request.state.repository)


async def get_settings(request: Request) -> Settings:
    return cast(Settings, request.state.settings)


async def get_tenant(request: Request) -> str:
    return cast(str, getattr(request.state, "tenant", DEFAULT_TENANT))


RepositoryDep = Annotated[SessionRepository, Depends(get_repository)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]


IfMatchHeader = Annotated[
    str | None,
    Header(
        description='Strong ETag of the session version the change applies to (e.g. `"7"`), or `*`. 412 when stale.'
    ),
]


async def parse_if_match(if_match: IfMatchHeader = None) -> Precondition | None:
    if if_match is None:
        return None
    versions: set[int] = set()
    for raw in if_match.split(","):
        tag = raw.strip()
        if tag == "*":
            return Precondition(any=True)
        # Weak tags never match under the strong comparison If-Match requires.
        # Versions fit in 19 digits; a longer tag cannot match (and int() of thousands
        # of digits raises).
        if 2 < len(tag) <= 21 and tag[0] == tag[-1] == '"' and tag[1:-1].isdigit():
            versions.add(int(tag[1:-1]))
    return Precondition(versions=frozenset(versions))


IfMatchDep = Annotated[Precondition | None, Depends(parse_if_match)]

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=255,
        description="Retry-safe key: the same key and body replay the first answer.",
    ),
]


def _reject_constant(name: str) -> Any:
    raise HTTPException(400, f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise HTTPException(400, f"the number {text[:40]} is too large for a double")
    return value


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise HTTPException(400, f"duplicate key {key!r} in a JSON object")
            seen.add(key)
    return result


def _reject_lone_surrogates(value: Any) -> None:
    """`"\\ud800"` is valid JSON text but no Unicode string: it could be stored and never sent back."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise HTTPException(400, "the body has a \\u escape of a lone UTF-16 surrogate") from exc
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def parse_strict_json(body: bytes) -> Any:
    """RFC 8259 JSON only: UTF-8, no NaN/Infinity (nor numbers that overflow to it), no duplicate keys."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, "the body is not valid UTF-8") from exc
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_object_without_duplicates,
        )
    except RecursionError as exc:
        raise HTTPException(422, "the body is nested too deeply") from exc
    if "\\u" in text:  # only an escape can make a surrogate: raw ones fail the UTF-8 decode above
        _reject_lone_surrogates(value)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_strict_json(await self.body())
        return self._json


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class JSONRoute(APIRoute):
    """Parses bodies strictly and answers 415 to a body that is not JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route_handler(request: Request) -> Response:
            strict = StrictJSONRequest(request.scope, request.receive)
            if takes_body:
                content_type = strict.headers.get("content-type")
                if content_type is not None and not _is_json(content_type):
                    raise HTTPException(415, f"send application/json, not {content_type}")
                if content_type is None and await strict.body():
                    raise HTTPException(415, "a body needs Content-Type: application/json")
            return await handler(strict)

        return route_handler


def stored_to_response(stored: StoredResponse, *, replayed: bool = False) -> Response:
    headers = dict(stored.headers)
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    media = "application/problem+json" if stored.status >= 400 else "application/json"
    return Response(stored.body, status_code=stored.status, headers=headers, media_type=media)


async def request_fingerprint(request: Request) -> str:
    digest = hashlib.sha256()
    digest.update(request.method.encode())
    digest.update(b"\0")
    digest.update(request.url.path.encode())
    digest.update(b"\0")
    digest.update(await request.body())
    return digest.hexdigest()


async def run_idempotent(
    *,
    request: Request,
    repository: SessionRepository,
    tenant: str,
    key: str | None,
    render: Renderer,
    action: Callable[[IdempotencyRequest | None], Awaitable[StoredResponse]],
) -> Response:
    """Run `action` once per (tenant, key): replay a stored answer, or run and store it.

    A successful action stores its own answer atomically with its change (the
    backend calls `render`); a 4xx is stored here; a 5xx releases the key so
    that a retry runs again.
    """
    if key is None:
        return stored_to_response(await action(None))
    fingerprint = await request_fingerprint(request)
    stored = await repository.idempotency_begin(tenant, key, fingerprint)
    if stored is not None:
        return stored_to_response(stored, replayed=True)
    try:
        answer = await action(IdempotencyRequest(key=key, fingerprint=fingerprint, render=render))
    except ChatSessionsError as exc:
        problem = domain_problem(exc)
        kept = None
        if problem.status_code < 500:
            kept = StoredResponse(problem.status_code, bytes(problem.body), {})
        await repository.idempotency_finish(tenant, key, kept)
        return problem
    except BaseException:
        await repository.idempotency_finish(tenant, key, None)
        raise
    return stored_to_response(answer)
