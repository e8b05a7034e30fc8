"""Helpers shared by the API tests: problem+json checks, an app with its repository, JSON builders."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import httpx
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from chatsessions.config import Settings
from chatsessions.main import create_app
from chatsessions.storage.base import SessionRepository

PROBLEM_JSON = "application/problem+json"
JSON = {"content-type": "application/json"}
MERGE_PATCH = {"content-type": "application/merge-patch+json"}


@dataclass(frozen=True, slots=True)
class RunningApp:
    client: httpx.AsyncClient
    repository: SessionRepository
    asgi: ASGIApp  # the app inside its lifespan, for clients with other transport options


@asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[RunningApp]:
    """A fresh app on `settings`, inside its lifespan, with the repository the lifespan built."""
    app = create_app(settings)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://test") as client,
    ):
        # The lifespan state is the only way to reach the repository the app really uses.
        repository = cast(SessionRepository, manager._state["repository"])
        yield RunningApp(client, repository, manager.app)


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with that status; returns its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == PROBLEM_JSON
    body = cast(dict[str, Any], response.json())
    assert isinstance(body.get("type"), str)
    assert body["type"]
    assert isinstance(body.get("title"), str)
    assert body["title"]
    assert body.get("status") == status
    assert isinstance(body.get("detail"), str)
    assert body["detail"]
    if status == 422 and "errors" in body:
        assert isinstance(body["errors"], list)
        assert body["errors"], "a validation problem lists what failed"
        for issue in body["errors"]:
            assert {"loc", "msg", "type"} <= set(issue)
    return body


def problem_mismatch(label: str, response: httpx.Response, status: int) -> str | None:
    """None when `response` is the expected problem; else one line saying what came instead.

    Table-driven tests send many requests to one app (a fresh app per case would be slow)
    and collect these lines, so that one run reports every failing case.
    """
    try:
        assert_problem(response, status)
    except AssertionError:
        return f"{label}: expected a {status} problem, got {response.status_code} {response.text[:200]!r}"
    return None


def nested(depth: int) -> dict[str, Any]:
    """A JSON object nested `depth` levels deep: `{}` is 1, `{"a": {}}` is 2."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def create(client: httpx.AsyncClient, session_id: str, **fields: Any) -> dict[str, Any]:
    response = await client.post("/v1/sessions", json={"id": session_id, **fields})
    assert response.status_code == 201, response.text
    return cast(dict[str, Any], response.json())


async def append(client: httpx.AsyncClient, session_id: str, *contents: str) -> list[dict[str, Any]]:
    response = await client.post(
        f"/v1/sessions/{session_id}/messages/batch",
        json={"messages": [{"role": "user", "content": c} for c in contents]},
    )
    assert response.status_code == 201, response.text
    return cast(list[dict[str, Any]], response.json()["items"])


async def fetch(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return cast(dict[str, Any], response.json())


async def contents(client: httpx.AsyncClient, session_id: str) -> list[str]:
    response = await client.get(f"/v1/sessions/{session_id}/messages", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return [m["content"] for m in response.json()["items"]]


async def snapshot(client: httpx.AsyncClient, session_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The session and its full history, to prove a rejected request changed nothing."""
    response = await client.get(f"/v1/sessions/{session_id}/messages", params={"limit": 1000})
    assert response.status_code == 200, response.text
    return await fetch(client, session_id), cast(list[dict[str, Any]], response.json()["items"])
