"""Application factory: `create_app(settings)`; one lifespan opens the keys and the repository."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

from fastapi import FastAPI

from chatsessions import __version__
from chatsessions.api import health
from chatsessions.api.access import AccessMiddleware
from chatsessions.api.appends import append_routes
from chatsessions.api.auth import BearerAuthMiddleware
from chatsessions.api.citations import build_citations_router
from chatsessions.api.creates import create_routes
from chatsessions.api.docs import install_docs
from chatsessions.api.logs import configure_logging
from chatsessions.api.messages import build_messages_router
from chatsessions.api.metrics import Metrics
from chatsessions.api.metrics import router as metrics_router
from chatsessions.api.middleware import BodyDeadlines, BodyLimitMiddleware
from chatsessions.api.openapi import build_openapi
from chatsessions.api.problems import install_problem_handlers
from chatsessions.api.search import build_search_router
from chatsessions.api.sessions import build_sessions_router
from chatsessions.api.startup import StartupRefusalMiddleware
from chatsessions.api.transfer import IMPORT_BODY_TIMEOUT_SECONDS, IMPORT_PATH, build_transfer_router
from chatsessions.config import Settings, StoreKind
from chatsessions.keys import KeySource
from chatsessions.models import DEFAULT_TENANT
from chatsessions.storage.base import SessionRepository, StoreObserver

log = logging.getLogger("chatsessions")


class State(TypedDict):
    """What the lifespan yields; every request sees it as `request.state` (ASGI scope["state"])."""

    repository: SessionRepository
    settings: Settings
    keys: KeySource | None
    metrics: Metrics
    body_deadlines: BodyDeadlines


async def build_repository(settings: Settings, observer: StoreObserver | None = None) -> SessionRepository:
    """Open the backend that `settings.store` names; `observer` receives its metrics."""
    if settings.store in (StoreKind.sqlite, StoreKind.memory):
        from chatsessions.storage.sqlite import SqliteSessionRepository

        return await SqliteSessionRepository.open(settings, observer=observer)
    from chatsessions.storage.postgres import PostgresSessionRepository

    return await PostgresSessionRepository.open(settings, observer=observer)


async def open_keys(settings: Settings) -> KeySource | None:
    """The keys file as the service reads it; None in open mode (and the log says so)."""
    if settings.keys_file is None:
        log.warning(
            "OPEN MODE: no keys file is configured (CHATSESSIONS_KEYS_FILE), so every caller is tenant %r "
            "without a key; create keys with `chatsessions keys create --tenant NAME`",
            DEFAULT_TENANT,
        )
        return None
    keys = await KeySource.open(settings.keys_file)
    log.info("API keys from %s: %d active", settings.keys_file, keys.ring.active_count)
    if keys.ring.active_count == 0:
        log.warning("keys file %s has no active key: every request under /v1 gets 401", settings.keys_file)
    return keys


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; nothing is opened until the lifespan starts."""
    resolved = settings if settings is not None else Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        logs = configure_logging(resolved)
        try:
            keys = await open_keys(resolved)  # a bad keys file stops the start-up before the store opens
            metrics = Metrics()
            repository = await build_repository(resolved, metrics.observer())
            log.info("chatsessions %s ready: store=%s", __version__, resolved.store.value)
            # What is alive now (modules, the app, the catalog) lives as long as the app: keep it
            # out of the collector's full passes, which otherwise rescan it under load.
            deadlines = BodyDeadlines(interval=min(1.0, resolved.body_timeout_seconds / 4))
            deadlines.start()
            gc.freeze()
            try:
                yield {
                    "repository": repository,
                    "settings": resolved,
                    "keys": keys,
                    "metrics": metrics,
                    "body_deadlines": deadlines,
                }
            finally:
                gc.unfreeze()
                await deadlines.aclose()
                await repository.aclose()
        finally:
            logs.close()

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
            {"name": "transfer", "description": "Export and import of sessions as NDJSON."},
            {"name": "health", "description": "Probes and metrics for orchestrators."},
        ],
    )
    install_problem_handlers(app)
    # Middlewares, innermost first: the body limit, authentication, then the request's id, log line and metrics.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=resolved.max_body_bytes,
        body_timeout=resolved.body_timeout_seconds,
        path_limits={IMPORT_PATH: resolved.max_import_bytes},
        path_timeouts={IMPORT_PATH: IMPORT_BODY_TIMEOUT_SECONDS},
    )
    app.add_middleware(BearerAuthMiddleware, keys_required=resolved.keys_file is not None)
    app.add_middleware(AccessMiddleware)
    app.add_middleware(StartupRefusalMiddleware)  # outermost: sees the lifespan's own failure
    # The hot path first, before even /openapi.json: the router tries routes in order.
    app.router.routes[0:0] = [*append_routes(), *create_routes()]
    app.include_router(build_sessions_router(resolved))
    app.include_router(build_messages_router(resolved))
    app.include_router(build_search_router(resolved))
    app.include_router(build_citations_router(resolved))
    app.include_router(build_transfer_router())
    app.include_router(health.router)
    app.include_router(metrics_router)
    install_docs(app)
    app.openapi = lambda: build_openapi(app, resolved)  # type: ignore[method-assign]
    return app
