"""A start-up refused by the store is reported in one line, not as a traceback.

Starlette reports an exception raised by the lifespan as its formatted
traceback (`lifespan.startup.failed`), which uvicorn logs as is. A store that
refuses to open (a locked, corrupt, incompatible or unreachable store: a
`StorageUnavailable`) already says exactly what is wrong in its message, so
this pure ASGI middleware holds the failure back and reports that message
alone. Any other start-up failure is a bug and keeps its traceback.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatsessions.errors import StorageUnavailable


class StartupRefusalMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_startup_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)
                return
            await send(message)

        try:
            await self.app(scope, receive, hold_startup_failure)
        except StorageUnavailable as exc:
            await send({"type": "lifespan.startup.failed", "message": f"chatsessions: {exc}"})
            raise
        except BaseException:
            for message in held:
                await send(message)
            raise
        for message in held:
            await send(message)
