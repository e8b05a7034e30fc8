"""Idempotency-Key: replay a stored answer, or run the change once and store its answer."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from starlette.responses import Response
from starlette.types import Send

from chatsessions.api.problems import PROBLEM_JSON, domain_problem
from chatsessions.errors import ChatSessionsError
from chatsessions.models import IdempotencyRequest, Renderer, StoredResponse
from chatsessions.storage.base import SessionRepository

REPLAYED_HEADER = "Idempotent-Replayed"


class Answer(NamedTuple):
    """What an idempotent call answers: the stored response, and whether it is a replay."""

    stored: StoredResponse
    replayed: bool = False

    def headers(self) -> dict[str, str]:
        headers = dict(self.stored.headers)
        if self.replayed:
            headers[REPLAYED_HEADER] = "true"
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
