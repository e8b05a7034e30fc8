"""A body that does not arrive in time: 408 with Connection: close, on the lean routes and the others alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chatsessions.config import Settings
from tests.api.support import JSON, assert_problem, create, running_app, snapshot

pytestmark = pytest.mark.asyncio


async def stalled(first: bytes) -> AsyncIterator[bytes]:
    yield first
    await asyncio.sleep(30)
    yield b"}"


@pytest.mark.parametrize(
    ("path", "first"),
    [("/v1/sessions/s/messages", b'{"role": "user", '), ("/v1/sessions/s/messages/batch", b'{"messages": ')],
)
async def test_a_stalled_body_is_408_and_changes_nothing(settings: Settings, path: str, first: bytes) -> None:
    quick = settings.model_copy(update={"body_timeout_seconds": 0.5})
    async with running_app(quick) as app:
        await create(app.client, "s")
        before = await snapshot(app.client, "s")
        response = await asyncio.wait_for(app.client.post(path, content=stalled(first), headers=JSON), 20)
        body = assert_problem(response, 408)
        assert "0.5 s" in body["detail"]
        assert response.headers["connection"] == "close"
        patched = await asyncio.wait_for(
            app.client.patch("/v1/sessions/s", content=stalled(b'{"title": '), headers=JSON), 20
        )
        assert_problem(patched, 408)
        assert await snapshot(app.client, "s") == before
        # A body that arrives in time is unaffected, and so is a request after a timeout.
        ok = await app.client.post("/v1/sessions/s/messages", json={"role": "user", "content": "x"})
        assert ok.status_code == 201
