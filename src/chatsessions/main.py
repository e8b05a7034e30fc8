"""Application factory: `create_app(settings)`; the lifespan owns the repository."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypedDict

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from chatsessions import __version__
from chatsessions.api import health
from chatsessions.api.appends import append_routes
from chatsessions.api.auth import install_auth
from chatsessions.api.citations import build_citations_router
from chatsessions.api.demo import build_demo_router
from chatsessions.api.docs import install_docs
from chatsessions.api.events import build_events_router
from chatsessions.api.messages import build_messages_router
from chatsessions.api.middleware import BodyLimitMiddleware
from chatsessions.api.problems import PROBLEM_JSON, install_problem_handlers
from chatsessions.api.search import build_search_router
from chatsessions.api.sessions import build_sessions_router
from chatsessions.api.startup import StartupRefusalMiddleware
from chatsessions.api.streaming import build_streaming_router
from chatsessions.config import Settings, StoreKind
from chatsessions.events import Broker, EventSink
from chatsessions.storage.base import SessionRepository, StoreObserver

log = logging.getLogger("chatsessions")


class State(TypedDict):
    repository: SessionRepository
    settings: Settings
    broker: Broker


async def build_repository(
    settings: Settings, observer: StoreObserver | None = None, *, sink: EventSink | None = None
) -> SessionRepository:
    """Open the backend that `settings.store` names; `observer` receives its metrics, `sink` its events."""
    if settings.store in (StoreKind.sqlite, StoreKind.memory):
        from chatsessions.storage.sqlite import SqliteSessionRepository

        return await SqliteSessionRepository.open(settings, observer=observer, sink=sink)
    from chatsessions.storage.postgres import PostgresSessionRepository

    return await PostgresSessionRepository.open(settings, observer=observer, sink=sink)


def _problem_openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI of the routes, every error typed as application/problem+json."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            tags=app.openapi_tags,
        )
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if status[0] in "45" and "application/json" in content:
                        content[PROBLEM_JSON] = content.pop("application/json")
                        response["content"] = content
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; nothing is opened until the lifespan starts."""
    resolved = settings if settings is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        broker = Broker(capacity=resolved.events_buffer, max_subscribers=resolved.events_max_subscribers)
        repository = await build_repository(resolved, sink=broker)
        log.info("chatsessions %s ready: store=%s", __version__, resolved.store.value)
        # What is alive now (modules, the app, the catalog) lives as long as the app: keep it
        # out of the collector's full passes, which otherwise rescan it under load.
        gc.freeze()
        try:
            yield {"repository": repository, "settings": resolved, "broker": broker}
        finally:
            gc.unfreeze()
            await repository.aclose()

    app = FastAPI(
        title="chatsessions",
        version=__version__,
        description="Chat-session history for LLM and RAG applications: sessions, append-only messages, "
        "idempotent appends, optimistic concurrency. Errors are RFC 9457 problem+json.",
        lifespan=lifespan,
        # FastAPI looks for an OpenTelemetry provider on every request (~7 µs) unless told not to.
        telemetry={"tracing": resolved.telemetry, "metrics": resolved.telemetry, "logs": resolved.telemetry},
        docs_url=None,
        redoc_url=None,
        openapi_tags=[
            {"name": "sessions", "description": "Create, read, list, patch and delete chat sessions."},
            {"name": "messages", "description": "Append to and page through a session's history."},
            {"name": "search", "description": "Full-text search of messages, and the citations index."},
            {"name": "events", "description": "Change feeds of a session and of the tenant (Server-Sent Events)."},
            {"name": "health", "description": "Probes for orchestrators."},
        ],
    )
    install_problem_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=resolved.max_body_bytes)
    # The hot path first, before even /openapi.json: the router tries routes in order.
    app.router.routes[0:0] = append_routes()
    app.include_router(build_sessions_router(resolved))
    app.include_router(build_messages_router(resolved))
    app.include_router(build_search_router(resolved))
    app.include_router(build_citations_router(resolved))
    app.include_router(build_streaming_router(resolved))
    app.include_router(build_events_router(resolved))
    app.include_router(build_demo_router())
    app.include_router(health.router)
    install_docs(app)
    app.openapi = lambda: _problem_openapi(app)  # type: ignore[method-assign]
    install_auth(app, resolved)
    app.add_middleware(StartupRefusalMiddleware)  # outermost: sees the lifespan's own failure
    return app
