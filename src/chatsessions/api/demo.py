"""`GET /demo/live`: a static page that follows a session with EventSource (open mode, or behind a proxy
that adds the key: EventSource cannot send an Authorization header)."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from starlette.responses import HTMLResponse


def build_demo_router() -> APIRouter:
    router = APIRouter()
    page = files("chatsessions").joinpath("static/live.html").read_text(encoding="utf-8")

    @router.get("/demo/live", include_in_schema=False)
    async def live_demo() -> HTMLResponse:
        return HTMLResponse(page)

    return router
