"""Pure ASGI middleware around every request: its id, its access-log line, its metrics.

- `X-Request-ID`: taken from the request when it is 1-128 visible ASCII characters,
  otherwise a new one is made (a bad one is never echoed); sent back on the answer
  and set in `REQUEST_ID` for every log line written while the request runs.
- One access line per request on the `chatsessions.access` logger: method, route
  template, status, duration, tenant and request id. Never a key, a body or a query.
- The request's count and latency, by route template (`api/metrics.py`).
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatsessions.api.metrics import Metrics

REQUEST_ID_HEADER = b"x-request-id"
REQUEST_ID: ContextVar[str | None] = ContextVar("chatsessions_request_id", default=None)
UNMATCHED = "unmatched"

access_log = logging.getLogger("chatsessions.access")


def valid_request_id(raw: bytes) -> bool:
    return 0 < len(raw) <= 128 and all(0x21 <= byte <= 0x7E for byte in raw)


def route_template(scope: Scope) -> str:
    """The template of the route that served the request; never the raw path (unbounded labels)."""
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    return template if isinstance(template, str) else UNMATCHED


class AccessMiddleware:
    """The outermost of our middlewares: sees every answer, 401s and 413s included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # Made ids: a random prefix per app and a counter (no syscall per request): 32 hex digits, unique.
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id: bytes | None = None
        for name, value in scope["headers"]:
            if name == REQUEST_ID_HEADER:
                request_id = value if valid_request_id(value) else None
                break
        if request_id is None:
            request_id = f"{self._prefix}{next(self._counter):016x}".encode()
        text_id = request_id.decode("ascii")
        token = REQUEST_ID.set(text_id)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # REQUEST_ID stays set: the server-error handler outside logs the exception with it.
            self._record(scope, status, time.perf_counter() - start, text_id)
            raise
        self._record(scope, status, time.perf_counter() - start, text_id)
        REQUEST_ID.reset(token)

    def _record(self, scope: Scope, status: int, seconds: float, request_id: str) -> None:
        state: dict[str, Any] = scope.get("state") or {}
        route = route_template(scope)
        method: str = scope["method"]
        metrics = state.get("metrics")
        if isinstance(metrics, Metrics):
            metrics.observe_request(method=method, route=route, status=status, seconds=seconds)
        if access_log.isEnabledFor(logging.INFO):
            tenant = state.get("tenant")
            access_log.info(
                "%s %s %d %.1fms tenant=%s request_id=%s",
                method,
                route,
                status,
                seconds * 1000,
                tenant,
                request_id,
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 3),
                    "tenant": tenant,
                    "request_id": request_id,
                },
            )
