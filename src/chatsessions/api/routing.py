"""Strict JSON bodies and the two route classes: `JSONRoute` for every route, `LeanRoute` for the hot path.

What a body must be: declared JSON (`application/json` or any `application/*+json`;
415 otherwise), UTF-8, RFC 8259 only (no NaN or Infinity, nor numbers that
overflow to it, no duplicate keys, no lone surrogates; 400 otherwise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Scope


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


def operation_id(route: APIRoute) -> str:
    """The handler's name: short and stable, what generated clients call the operation."""
    return route.name


class JSONRoute(APIRoute):
    """Parses bodies strictly and answers 415 to a body that is not JSON.

    Its OpenAPI summary is the first line of the handler's docstring, its operationId the handler's name.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not kwargs.get("summary") and endpoint.__doc__:
            kwargs["summary"] = endpoint.__doc__.strip().splitlines()[0]
        kwargs["generate_unique_id_function"] = operation_id
        super().__init__(path, endpoint, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def route_handler(request: Request) -> Response:
            strict = StrictJSONRequest(request.scope, request.receive)
            if takes_body:
                check_json_media(strict.headers.get("content-type"), await strict.body())
            return await handler(strict)

        return route_handler


class LeanRoute(JSONRoute):
    """A route whose handler is a plain ASGI callable, for the few operations where FastAPI's costs show.

    `endpoint` describes the operation: FastAPI builds its OpenAPI operation from that
    signature, and the tests serve the same endpoint on a plain `JSONRoute` as the
    reference the lean handler must answer like. It is never called here. `serve`
    reads its inputs from the scope and `receive` itself, sends the answer itself, and
    raises errors, which reach the app's exception handlers (`ExceptionMiddleware`)
    like any route's.


    With `owns_path`, the route takes every request to its path, so another method gets
    405 here instead of reaching a templated route that matches the path too
    (`GET /messages/batch` is not `GET /messages/{seq}` with seq "batch").
    """

    def __init__(
        self, path: str, endpoint: Callable[..., Any], *, serve: ASGIApp, owns_path: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.app = serve
        self.owns_path = owns_path

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.PARTIAL and self.owns_path:
            return Match.FULL, child_scope  # Route.handle answers 405 for the other methods
        return match, child_scope
