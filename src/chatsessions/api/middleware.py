"""Pure ASGI middleware: the request body's limits in size (413) and time (408), enforced while it streams in."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatsessions.api.problems import problem_response

DEADLINES_STATE = "body_deadlines"


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds {limit} bytes")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float) -> None:
        super().__init__(408, f"the request body did not arrive within {seconds:g} s", headers={"Connection": "close"})


class BodyDeadlines:
    """Body reads past their deadline, cancelled by one sweep every `interval` seconds.

    A timer per read (`asyncio.timeout`) costs an append about 10 µs; here a read
    costs a dict entry, and a sweeper task, started and stopped by the lifespan,
    cancels the reads whose deadline has passed (so a deadline holds to within
    `interval`). A read cancelled that way raises `BodyTimeout`; any other
    cancellation passes through untouched.
    """

    def __init__(self, *, interval: float) -> None:
        self.interval = interval
        self._waiting: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="chatsessions-body-deadlines")

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            now = loop.time()
            # Only the event loop touches these; while this runs, every waiting task is suspended in its read.
            for task, deadline in list(self._waiting.items()):
                if deadline <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    async def receive(self, receive: Receive, *, deadline: float, seconds: float) -> Message:
        task = asyncio.current_task()
        assert task is not None
        self._waiting[task] = deadline
        try:
            return await receive()
        except asyncio.CancelledError:
            if task in self._expired:
                task.uncancel()
                raise BodyTimeout(seconds) from None
            raise
        finally:
            del self._waiting[task]
            self._expired.discard(task)


class BodyLimitMiddleware:
    """Answer 413 for a declared Content-Length over the limit without reading a byte;
    otherwise count the chunks as they arrive (chunked bodies included) and stop at
    the first byte over the limit. `path_limits` gives paths a limit of their own, and
    `path_timeouts` a body deadline of their own (the streamed import).

    The whole body must arrive within `body_timeout` seconds of the request: otherwise
    the read raises `BodyTimeout`, answered 408 with `Connection: close` (the server
    then closes the connection, whose stream is in an unknown state)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        body_timeout: float,
        path_limits: dict[str, int] | None = None,
        path_timeouts: dict[str, float] | None = None,
    ) -> None:
        self.app = app
        self.default_limit = max_body_bytes
        self.body_timeout = body_timeout
        self.path_limits = dict(path_limits or {})
        self.path_timeouts = dict(path_timeouts or {})

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
        complete = False
        timeout = self.path_timeouts.get(scope["path"], self.body_timeout)
        deadline = asyncio.get_running_loop().time() + timeout
        deadlines = (scope.get("state") or {}).get(DEADLINES_STATE)

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, a receive waits for the disconnect: no deadline
                return await receive()
            if isinstance(deadlines, BodyDeadlines):
                message = await deadlines.receive(receive, deadline=deadline, seconds=timeout)
            else:  # an app run without its lifespan
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
