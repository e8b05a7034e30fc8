"""Pure ASGI middleware: the request body's limits in size (413) and time (408), enforced while it streams in."""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatsessions.api.problems import problem_response


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s", headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Answer 413 for a declared Content-Length over the limit without reading a byte;
    otherwise count the chunks as they arrive (chunked bodies included) and stop at
    the first byte over the limit.

    The whole body must arrive within `body_timeout` seconds of the request: otherwise
    the read raises `BodyTimeout`, answered 408 with `Connection: close` (the server
    then closes the connection, whose stream is in an unknown state)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.limit:
                    response = problem_response(413, f"the request body exceeds {self.limit} bytes")
                    response.headers["Connection"] = "close"
                    await response(scope, receive, send)
                    return
                break
        received = 0
        limit = self.limit
        complete = False
        timeout = self.body_timeout
        deadline = asyncio.get_running_loop().time() + timeout

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, a receive waits for the disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeout(timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)
