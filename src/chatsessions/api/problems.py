"""RFC 9457 problem details: the one place where errors become HTTP answers."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Match

from chatsessions import errors

log = logging.getLogger("chatsessions")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://chatsessions.dev/problems/"

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    428: "Precondition Required",
    500: "Internal Server Error",
    503: "Service Unavailable",
    507: "Insufficient Storage",
}


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem; `errors` lists what failed validation."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ValidationIssue] | None = None


def problem_response(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    errors_: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (kind or str(status)),
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if errors_ is not None:
        body["errors"] = errors_
    return Response(
        json.dumps(jsonable_encoder(body), separators=(",", ":")).encode(),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


# Domain error → (status, problem type slug). Order matters: subclasses first.
_DOMAIN: list[tuple[type[errors.ChatSessionsError], int, str]] = [
    (errors.SessionNotFound, 404, "session-not-found"),
    (errors.MessageNotFound, 404, "message-not-found"),
    (errors.SessionExists, 409, "session-exists"),
    (errors.MessageExists, 409, "message-exists"),
    (errors.MessageNotInProgress, 409, "message-not-in-progress"),
    (errors.PreconditionFailed, 412, "precondition-failed"),
    (errors.IdempotencyInProgress, 409, "idempotency-in-progress"),
    (errors.IdempotencyKeyReused, 422, "idempotency-key-reused"),
    (errors.InvalidInput, 422, "validation-error"),
    (errors.StorageFull, 507, "storage-full"),
    (errors.TooManyStreams, 503, "too-many-streams"),
    (errors.StorageCorrupted, 503, "storage-corrupted"),
    (errors.StorageUnavailable, 503, "storage-unavailable"),
]


def domain_problem(exc: errors.ChatSessionsError) -> Response:
    for cls, status, kind in _DOMAIN:
        if isinstance(exc, cls):
            if isinstance(exc, errors.InvalidInput):
                issue = {"loc": list(exc.loc), "msg": str(exc), "type": "value_error"}
                return problem_response(status, str(exc), kind=kind, errors_=[issue])
            headers: dict[str, str] = {}
            if status in (503, 409) and kind not in ("session-exists", "message-exists", "message-not-in-progress"):
                headers["Retry-After"] = "1"
            if isinstance(exc, errors.PreconditionFailed):
                headers["ETag"] = f'"{exc.version}"'  # the current version, to retry against
            return problem_response(status, str(exc), kind=kind, headers=headers or None)
    log.exception("unmapped domain error", exc_info=exc)
    return problem_response(500, "internal error", kind="internal")


def _validation_issues(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]


def validation_problem(exc: RequestValidationError) -> Response:
    issues = _validation_issues(exc)
    if any(i["type"] == "json_invalid" for i in issues):
        return problem_response(400, "the body is not valid JSON", kind="malformed-json", errors_=issues)
    return problem_response(422, "the request failed validation", kind="validation-error", errors_=issues)


def http_problem(exc: HTTPException) -> Response:
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "error")
    return problem_response(exc.status_code, detail, headers=dict(exc.headers or {}))


async def _on_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(exc)


def _allowed_methods(request: Request) -> str:
    """The methods of the routes whose path matches, under the most concrete template that matches.

    Starlette's 405 names only the methods of the route that answered; a resource served by
    several routes (GET and POST /v1/sessions) needs them all, and `/messages/batch` must not
    borrow GET from `/messages/{seq}` (concrete paths match before templated ones, as in OpenAPI).
    """
    found: dict[int, set[str]] = {}
    for route in iter_route_contexts(request.app.router.routes):
        if route.methods and route.matches(request.scope)[0] is not Match.NONE:
            found.setdefault(len(route.param_convertors), set()).update(route.methods)
    return ", ".join(sorted(found[min(found)])) if found else ""


async def _on_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        exc.headers = {**(exc.headers or {}), "Allow": _allowed_methods(request)}
    return http_problem(exc)


async def _on_domain(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ChatSessionsError)
    return domain_problem(exc)


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal error; this is a bug", kind="internal")


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(HTTPException, _on_http)
    app.add_exception_handler(errors.ChatSessionsError, _on_domain)
    app.add_exception_handler(Exception, _on_unexpected)


# Response headers, as OpenAPI header objects.
HEADER_DOCS: dict[str, dict[str, Any]] = {
    "ETag": {
        "description": 'The session\'s version as a strong entity tag (`"7"`), for `If-Match`.',
        "schema": {"type": "string", "pattern": r'^"[0-9]+"$'},
    },
    "Location": {"description": "Path of the created resource.", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when this is the stored answer to an earlier request with the same Idempotency-Key.",
        "schema": {"type": "string", "enum": ["true"]},
    },
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer", "minimum": 0},
    },
}
_PROBLEM_HEADERS = {409: ("Retry-After",), 412: ("ETag",), 503: ("Retry-After",)}


def headers_doc(*names: str) -> dict[str, dict[str, Any]]:
    return {name: HEADER_DOCS[name] for name in names}


def success_doc(description: str, *headers: str, model: Any = None) -> dict[str, Any]:
    """An OpenAPI `responses` entry of a success answer with its headers."""
    entry: dict[str, Any] = {"description": description, "headers": headers_doc(*headers)}
    if model is not None:
        entry["model"] = model
    return entry


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the errors an operation can answer, with their headers."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": Problem, "description": _TITLES.get(status, "Error")}
        entry["content"] = {PROBLEM_JSON: {}}
        if status in _PROBLEM_HEADERS:
            entry["headers"] = headers_doc(*_PROBLEM_HEADERS[status])
        responses[status] = entry
    return responses
