"""Shared fixtures: a repository per backend, and an app client on the real lifespan."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager

from chatsessions.config import Settings, StoreKind
from chatsessions.main import build_repository, create_app
from chatsessions.storage.base import SessionRepository

POSTGRES_DSN_VAR = "CHATSESSIONS_TEST_POSTGRES_DSN"
BACKENDS = ["memory", "sqlite", "postgres"]


def postgres_dsn() -> str:
    dsn = os.environ.get(POSTGRES_DSN_VAR)
    if not dsn:
        pytest.skip(f"{POSTGRES_DSN_VAR} is not set; PostgreSQL tests need a server")
    return dsn


def make_settings(store: str, tmp_path: Path, **overrides: object) -> Settings:
    """Settings for one test: its own data dir, or its own PostgreSQL schema."""
    values: dict[str, object] = {"store": StoreKind(store), "data_dir": tmp_path / "data"}
    if store == "postgres":
        values["postgres_dsn"] = postgres_dsn()
        values["postgres_schema"] = f"test_{uuid.uuid4().hex[:12]}"
        # A shared CI machine can stall a statement for seconds (first-use type introspection on a
        # catalog that hundreds of test schemas have churned); the product default stays 5 s.
        values["postgres_timeout_seconds"] = 30.0
    values.update(overrides)
    return Settings.model_validate(values)


async def drop_postgres_schema(settings: Settings) -> None:
    if settings.store is not StoreKind.postgres:
        return
    import asyncpg

    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{settings.postgres_schema}" CASCADE')
    finally:
        await conn.close()


@pytest_asyncio.fixture(params=BACKENDS)
async def repository(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionRepository]:
    settings = make_settings(request.param, tmp_path)
    repo = await build_repository(settings)
    try:
        yield repo
    finally:
        await repo.aclose()
        await drop_postgres_schema(settings)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """SQLite-store settings for API tests (the default store)."""
    return make_settings("sqlite", tmp_path)


@pytest_asyncio.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://test") as http,
    ):
        yield http
