"""What the client raises: every problem+json answer, and a service it cannot reach, as one small tree.

ChatSessionsError               any error answer (``status``, ``type``, ``detail``, ``problem``)
├── Unauthorized         401/403  no key, or a key that is not valid
├── NotFound             404      no such session or message (for this tenant)
├── Conflict             409      the id exists (``session-exists``, ``message-exists``), or a retry is running
├── PreconditionFailed   412      a stale ``if_match``; ``etag`` is the session's current one
├── ValidationFailed     400/413/415/422  the request is invalid; ``errors`` lists what failed
└── Unavailable          503/507  the store cannot read or write now, or the service cannot be
                                  reached (``status`` None); raised once the retries are spent

These names belong to the client; the service's own domain errors live in
`chatsessions.errors`.
"""

from __future__ import annotations

from typing import Any

import httpx


class ChatSessionsError(Exception):
    """An error answer of the service (an RFC 9457 problem), or no answer at all."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        type: str | None = None,
        problem: dict[str, Any] | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(detail if status is None else f"{status}: {detail}")
        self.detail = detail
        self.status = status
        self.type = type
        self.problem = problem or {}
        self.response = response

    @property
    def kind(self) -> str | None:
        """The last segment of the problem type: `session-exists`, `message-exists`, ..."""
        return self.type.rsplit("/", 1)[-1] if self.type else None


class Unauthorized(ChatSessionsError):
    pass


class NotFound(ChatSessionsError):
    pass


class Conflict(ChatSessionsError):
    pass


class PreconditionFailed(ChatSessionsError):
    """`etag` is the session's current ETag: read it, or pass it as `if_match` to retry."""

    @property
    def etag(self) -> str | None:
        return self.response.headers.get("etag") if self.response is not None else None


class ValidationFailed(ChatSessionsError):
    """`errors` lists each failed field: `{"loc": [...], "msg": ..., "type": ...}`."""

    @property
    def errors(self) -> list[dict[str, Any]]:
        found = self.problem.get("errors")
        return list(found) if isinstance(found, list) else []


class Unavailable(ChatSessionsError):
    """`retry_after` is the wait the service asked for, in seconds (None when it gave none)."""

    @property
    def retry_after(self) -> float | None:
        return retry_after(self.response) if self.response is not None else None


_BY_STATUS: dict[int, type[ChatSessionsError]] = {
    400: ValidationFailed,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    412: PreconditionFailed,
    413: ValidationFailed,
    415: ValidationFailed,
    422: ValidationFailed,
    503: Unavailable,
    507: Unavailable,
}


def retry_after(response: httpx.Response) -> float | None:
    """The `Retry-After` of an answer in seconds (the delay-seconds form), None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def error_for(response: httpx.Response) -> ChatSessionsError:
    """The exception for an error answer (problem+json, or whatever a proxy in between sent)."""
    problem: dict[str, Any] = {}
    try:
        body = response.json()
        if isinstance(body, dict):
            problem = body
    except ValueError:
        pass
    detail = str(problem.get("detail") or response.reason_phrase or "error")
    cls = _BY_STATUS.get(response.status_code, ChatSessionsError)
    if response.status_code in (502, 504):  # a proxy in front of the service
        cls = Unavailable
    kind = problem.get("type")
    return cls(
        detail,
        status=response.status_code,
        type=kind if isinstance(kind, str) else None,
        problem=problem,
        response=response,
    )
