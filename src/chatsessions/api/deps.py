"""Dependencies as named types, the strict JSON route, and the idempotency wrapper."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any, NamedTuple, cast

from fastapi import Depends, Header, Request
from fastapi.routing import APIRoute
from pydantic import StringConstraints
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import Send

from chatsessions.api.problems import PROBLEM_JSON, domain_problem
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

IdempotencyKey = Annotated[str, StringConstraints(min_length=1, max_length=255)]
IdempotencyKeyHeader = Annotated[
    IdempotencyKey | None,
    Header(description="Retry-safe key: the same key and body replay the first answer."),
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


_STRICT_DECODER = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_object_without_duplicates
)


def parse_strict_json(body: bytes) -> Any:
    """RFC 8259 JSON only: UTF-8, no NaN/Infinity (nor numbers that overflow to it), no duplicate keys."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HTTPException(400, "the body is not valid UTF-8") from exc
    try:
        value = _STRICT_DECODER.decode(text)
    except RecursionError as exc:
        raise HTTPException(422, "the body is nested too deeply") from exc
    except json.JSONDecodeError:
        raise
    except ValueError as exc:  # an integer of more digits than int() takes
        raise HTTPException(400, "the body has an integer of more digits than this service reads") from exc
    if "\\u" in text:  # only an escape can make a surrogate: raw ones fail the UTF-8 decode above
        _reject_lone_surrogates(value)
    return value


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_strict_json(await self.body())
        return self._json


def is_json_media(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def check_json_media(content_type: str | None, body: bytes) -> None:
    """415 unless the body is declared JSON (an empty body may go undeclared)."""
    if content_type is not None and not is_json_media(content_type):
        raise HTTPException(415, f"send application/json, not {content_type}")
    if content_type is None and body:
        raise HTTPException(415, "a body needs Content-Type: application/json")


class JSONRoute(APIRoute):
    """Parses bodies strictly and answers 415 to a body that is not JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route_handler(request: Request) -> Response:
            strict = StrictJSONRequest(request.scope, request.receive)
            if takes_body:
                check_json_media(strict.headers.get("content-type"), await strict.body())
            return await handler(strict)

        return route_handler


class Answer(NamedTuple):
    """What an idempotent call answers: the stored response, and whether it is a replay."""

    stored: StoredResponse
    replayed: bool = False

    def headers(self) -> dict[str, str]:
        headers = dict(self.stored.headers)
        if self.replayed:
            headers["Idempotent-Replayed"] = "true"
        return headers

    @property
    def media_type(self) -> str:
        return PROBLEM_JSON if self.stored.status >= 400 else "application/json"

    def response(self) -> Response:
        stored = self.stored
        return Response(stored.body, status_code=stored.status, headers=self.headers(), media_type=self.media_type)

    async def send(self, send: Send) -> None:
        """Send it as plain ASGI messages, without building a Response."""
        body = self.stored.body
        raw = [(b"content-type", self.media_type.encode()), (b"content-length", str(len(body)).encode())]
        raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers().items()]
        await send({"type": "http.response.start", "status": self.stored.status, "headers": raw})
        await send({"type": "http.response.body", "body": body})


def stored_to_response(stored: StoredResponse) -> Response:
    return Answer(stored).response()


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    """What an Idempotency-Key is bound to: the same key with another request is refused."""
    return hashlib.sha256(b"\0".join((method.encode(), path.encode(), body))).hexdigest()


async def run_idempotent(
    *,
    repository: SessionRepository,
    tenant: str,
    key: str | None,
    request: tuple[str, str, bytes],
    render: Renderer,
    action: Callable[[IdempotencyRequest | None], Awaitable[StoredResponse]],
) -> Answer:
    """Run `action` once per (tenant, key): replay a stored answer, or run and store it.

    `request` is (method, path, body): what the key is bound to (hashed only when there is a key).

    A successful action stores its own answer atomically with its change (the
    backend calls `render`); a 4xx is stored here; a 5xx releases the key so
    that a retry runs again.
    """
    if key is None:
        return Answer(await action(None))
    fingerprint = request_fingerprint(*request)
    stored = await repository.idempotency_begin(tenant, key, fingerprint)
    if stored is not None:
        return Answer(stored, replayed=True)
    try:
        answer = await action(IdempotencyRequest(key=key, fingerprint=fingerprint, render=render))
    except ChatSessionsError as exc:
        problem = domain_problem(exc)
        body = bytes(problem.body)
        await repository.idempotency_finish(
            tenant, key, StoredResponse(problem.status_code, body) if problem.status_code < 500 else None
        )
        extra = {k: v for k, v in problem.headers.items() if k not in ("content-type", "content-length")}
        return Answer(StoredResponse(problem.status_code, body, extra))
    except BaseException:
        await repository.idempotency_finish(tenant, key, None)
        raise
    return Answer(answer)
