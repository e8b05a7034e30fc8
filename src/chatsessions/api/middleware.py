"""Pure ASGI middleware: the request body limit, enforced while the body streams in."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatsessions.api.problems import problem_response


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


class BodyLimitMiddleware:
    """Answer 413 for a declared Content-Length over the limit without reading a byte;
    otherwise count the chunks as they arrive (chunked bodies included) and stop at
    the first byte over the limit. `path_limits` gives paths a limit of their own
    (the streamed import)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, path_limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_limit = max_body_bytes
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope["path"], self.default_limit)
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > limit:
                    response = problem_response(413, f"the request body exceeds {limit} bytes")
                    response.headers["Connection"] = "close"
                    await response(scope, receive, send)
                    return
                break
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send)
