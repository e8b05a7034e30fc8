"""The operations as data (sans I/O): each builds a `Call`, and each `Call` knows how to read its answer.

`ChatSessions` and `AsyncChatSessions` only send calls (with retries); what goes
on the wire and how an answer becomes a model is written once, here, with the
service's own pydantic models, so the client cannot drift from the schema.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from chatsessions.client.errors import Unavailable, ValidationFailed, error_for, retry_after
from chatsessions.models import (
    CitationPage,
    Message,
    MessageBatch,
    MessageBatchCreate,
    MessageCreate,
    MessagePage,
    Order,
    Role,
    SearchPage,
    Session,
    SessionCreate,
    SessionPage,
    SessionPatch,
    SessionPut,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# What `if_match=` takes: a Session you read, its ETag (`'"7"'`), or its version (7).
IfMatch = Session | str | int | None
# A message to append: the model, or the same fields as a mapping (as OpenAI's SDK gives them).
MessageInput = MessageCreate | Mapping[str, Any]
RETRIED_STATUSES = frozenset({502, 503, 504, 507})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How calls are retried: on connection errors, and on 502/503/504/507 answers.

    A wait is `backoff * 2**attempt` seconds with full jitter, at most `max_delay`; an
    answer's `Retry-After` replaces it (also capped by `max_delay`). Every state-changing
    POST carries an `Idempotency-Key` that stays the same across its retries, so a retry
    whose first attempt did reach the service is answered with the first answer, never
    applied twice. `on_retry(attempt, delay, reason)` is called before each wait.
    """

    attempts: int = 4  # tries in all, the first included
    backoff: float = 0.2
    max_delay: float = 10.0
    on_retry: Callable[[int, float, str], None] | None = field(default=None, compare=False)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before try `attempt + 1` (0-based `attempt` just failed)."""
        if retry_after is not None:
            return min(retry_after, self.max_delay)
        return random.uniform(0, min(self.max_delay, self.backoff * 2**attempt))


NO_RETRIES = RetryPolicy(attempts=1)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One HTTP request and how to read its answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # Whether the request may be sent again after it might have reached the service.
    replayable: bool = True
    ok: tuple[int, ...] = (200, 201, 204)

    def result(self, response: httpx.Response) -> T:
        if response.status_code not in self.ok:
            raise error_for(response)
        return self.read(response)


def etag_of(if_match: IfMatch) -> str | None:
    if if_match is None:
        return None
    if isinstance(if_match, Session):
        return if_match.etag
    if isinstance(if_match, int):
        return f'"{if_match}"'
    return if_match if if_match.startswith('"') or if_match == "*" else f'"{if_match}"'


def _headers(*, if_match: IfMatch = None, idempotency_key: str | None = None) -> dict[str, str]:
    headers: dict[str, str] = {}
    if (etag := etag_of(if_match)) is not None:
        headers["If-Match"] = etag
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def new_idempotency_key() -> str:
    return f"cs-{uuid.uuid4().hex}"


def _model(cls: type[M], given: M | Mapping[str, Any] | None, fields: Mapping[str, Any]) -> M:
    """`given` or `fields` as `cls`, validated here as the service will (a ValidationFailed if not)."""
    try:
        if isinstance(given, BaseModel):
            if not fields:
                return cls.model_validate(given, from_attributes=True)
            given = given.model_dump(exclude_unset=True)
        return cls.model_validate({**(given or {}), **fields})
    except ValidationError as exc:
        raise _invalid(exc, "body") from exc


def _invalid(exc: ValidationError, *loc: str | int) -> ValidationFailed:
    errors = [{"loc": [*loc, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]
    problem = {"type": "about:blank", "title": "Invalid request", "detail": str(exc), "errors": errors}
    return ValidationFailed("the request is invalid (checked before sending)", problem=problem)


def _body(model: BaseModel) -> Any:
    # Only what was set: the service applies its own defaults, and a merge patch's nulls stay.
    return model.model_dump(mode="json", exclude_unset=True)


def _reader(cls: type[M]) -> Callable[[httpx.Response], M]:
    def read(response: httpx.Response) -> M:
        return cls.model_validate_json(response.content)

    return read


def _nothing(response: httpx.Response) -> None:
    return None


def _params(**values: Any) -> dict[str, Any]:
    return {
        key: (value.value if isinstance(value, Order | Role) else value)
        for key, value in values.items()
        if value is not None
    }


def _session_path(session_id: str) -> str:
    return f"/v1/sessions/{session_id}"


# --- sessions -------------------------------------------------------------------


def create_session(
    data: SessionCreate | Mapping[str, Any] | None, fields: Mapping[str, Any], idempotency_key: str | None
) -> Call[Session]:
    body = _model(SessionCreate, data, fields)
    key = idempotency_key or new_idempotency_key()
    return Call("POST", "/v1/sessions", _reader(Session), json=_body(body), headers=_headers(idempotency_key=key))


def put_session(
    session_id: str, data: SessionPut | Mapping[str, Any] | None, fields: Mapping[str, Any]
) -> Call[tuple[Session, bool]]:
    body = _model(SessionPut, data, fields)

    def read(response: httpx.Response) -> tuple[Session, bool]:
        return Session.model_validate_json(response.content), response.status_code == 201

    return Call("PUT", _session_path(session_id), read, json=_body(body))


def get_session(session_id: str) -> Call[Session | None]:
    return Call("GET", _session_path(session_id), _none_on_404(Session), ok=(200, 404))


def _none_on_404(cls: type[M]) -> Callable[[httpx.Response], M | None]:
    read = _reader(cls)

    def maybe(response: httpx.Response) -> M | None:
        return None if response.status_code == 404 else read(response)

    return maybe


def list_sessions(
    *,
    user_id: str | None,
    document_id: str | None,
    section_id: str | None,
    cited_doc_id: str | None,
    limit: int | None,
    cursor: str | None,
) -> Call[SessionPage]:
    params = _params(
        user_id=user_id,
        document_id=document_id,
        section_id=section_id,
        cited_doc_id=cited_doc_id,
        limit=limit,
        cursor=cursor,
    )
    return Call("GET", "/v1/sessions", _reader(SessionPage), params=params)


def patch_session(
    session_id: str, patch: SessionPatch | Mapping[str, Any] | None, fields: Mapping[str, Any], if_match: IfMatch
) -> Call[Session]:
    body = _model(SessionPatch, patch, fields)
    # A merge patch is not idempotent by key; with If-Match, a replay after success answers 412.
    return Call(
        "PATCH",
        _session_path(session_id),
        _reader(Session),
        json=_body(body),
        headers={"Content-Type": "application/merge-patch+json", **_headers(if_match=if_match)},
        replayable=False,
    )


def delete_session(session_id: str, if_match: IfMatch) -> Call[None]:
    return Call("DELETE", _session_path(session_id), _nothing, headers=_headers(if_match=if_match))


# --- messages -------------------------------------------------------------------


def append_message(
    session_id: str,
    message: MessageInput | None,
    fields: Mapping[str, Any],
    if_match: IfMatch,
    idempotency_key: str | None,
) -> Call[Message]:
    body = _model(MessageCreate, message, fields)
    key = idempotency_key or new_idempotency_key()
    headers = _headers(if_match=if_match, idempotency_key=key)
    return Call("POST", f"{_session_path(session_id)}/messages", _reader(Message), json=_body(body), headers=headers)


def append_messages(
    session_id: str, messages: Sequence[MessageInput], if_match: IfMatch, idempotency_key: str | None
) -> Call[list[Message]]:
    try:
        items = [m if isinstance(m, MessageCreate) else MessageCreate.model_validate(m) for m in messages]
        batch = MessageBatchCreate(messages=items)
    except ValidationError as exc:
        raise _invalid(exc, "body", "messages") from exc
    key = idempotency_key or new_idempotency_key()
    headers = _headers(if_match=if_match, idempotency_key=key)
    body = {"messages": [_body(m) for m in batch.messages]}

    def read(response: httpx.Response) -> list[Message]:
        return MessageBatch.model_validate_json(response.content).items

    return Call("POST", f"{_session_path(session_id)}/messages/batch", read, json=body, headers=headers)


def list_messages(
    session_id: str, *, after: int | None, before: int | None, limit: int | None, order: Order | str | None
) -> Call[MessagePage]:
    params = _params(after=after, before=before, limit=limit, order=Order(order) if order is not None else None)
    return Call("GET", f"{_session_path(session_id)}/messages", _reader(MessagePage), params=params)


def get_message(session_id: str, seq: int) -> Call[Message | None]:
    read = _none_on_404(Message)

    def message_or_none(response: httpx.Response) -> Message | None:
        if response.status_code == 404 and str(_problem_type(response)).endswith("/session-not-found"):
            raise error_for(response)  # None means "no such message" only
        return read(response)

    return Call("GET", f"{_session_path(session_id)}/messages/{seq}", message_or_none, ok=(200, 404))


def delete_message(session_id: str, seq: int, if_match: IfMatch) -> Call[None]:
    path = f"{_session_path(session_id)}/messages/{seq}"
    return Call("DELETE", path, _nothing, headers=_headers(if_match=if_match))


def clear_messages(session_id: str, if_match: IfMatch) -> Call[None]:
    return Call("DELETE", f"{_session_path(session_id)}/messages", _nothing, headers=_headers(if_match=if_match))


# --- search and citations ---------------------------------------------------------


def search_messages(
    q: str,
    *,
    user_id: str | None,
    document_id: str | None,
    section_id: str | None,
    role: Role | str | None,
    limit: int | None,
    cursor: str | None,
) -> Call[SearchPage]:
    params = _params(
        q=q,
        user_id=user_id,
        document_id=document_id,
        section_id=section_id,
        role=Role(role) if role is not None else None,
        limit=limit,
        cursor=cursor,
    )
    return Call("GET", "/v1/search", _reader(SearchPage), params=params)


def list_citations(
    doc_id: str, *, user_id: str | None, section_id: str | None, limit: int | None, cursor: str | None
) -> Call[CitationPage]:
    params = _params(doc_id=doc_id, user_id=user_id, section_id=section_id, limit=limit, cursor=cursor)
    return Call("GET", "/v1/citations", _reader(CitationPage), params=params)


def next_message_bounds(
    page: MessagePage, order: Order, after: int | None, before: int | None
) -> tuple[int | None, int | None] | None:
    """The `after`/`before` of the page following `page`, None when it was the last."""
    if not page.has_more or not page.items:
        return None
    last = page.items[-1].seq
    return (last, before) if order is Order.asc else (after, last)


def retry_delay(
    call: Call[Any],
    policy: RetryPolicy,
    attempt: int,
    *,
    response: httpx.Response | None = None,
    error: httpx.TransportError | None = None,
) -> float | None:
    """Seconds to wait before trying `call` again after try `attempt` (0-based) failed; None: do not retry."""
    if attempt + 1 >= policy.attempts:
        return None
    if error is not None:
        # A request that may have reached the service is sent again only when that is safe.
        never_sent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
        if not (call.replayable or never_sent):
            return None
        reason = f"{type(error).__name__}: {error}"
        delay = policy.delay(attempt, None)
    elif response is not None and _retried(response):
        reason = f"{response.status_code} answer"
        delay = policy.delay(attempt, retry_after(response))
    else:
        return None
    if policy.on_retry is not None:
        policy.on_retry(attempt + 1, delay, reason)
    return delay


def _retried(response: httpx.Response) -> bool:
    if response.status_code in RETRIED_STATUSES:
        return True
    # The first request with this Idempotency-Key is still running: its answer will be replayed.
    return (
        response.status_code == 409
        and response.headers.get("content-type", "").startswith("application/problem+json")
        and str(_problem_type(response)).endswith("/idempotency-in-progress")
    )


def _problem_type(response: httpx.Response) -> object:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("type") if isinstance(body, dict) else None


def unreachable(error: httpx.TransportError, attempts: int) -> Unavailable:
    return Unavailable(f"the service could not be reached after {attempts} tries ({type(error).__name__}: {error})")
