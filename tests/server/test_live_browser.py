"""`/demo/live` in headless Chromium: text shows up as it is written, and the page resumes after a restart.

Chromium is driven over the DevTools protocol (a websocket; `websockets` comes with
uvicorn[standard]): the page is opened once and stays open while the server stops
and starts again on the same port, so what it shows after the restart is what its
EventSource replayed with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.server.proc import free_port, running_server, server_env

CHROMIUM = "/usr/bin/chromium"
WAIT = 20.0

pytestmark = [
    pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="needs /usr/bin/chromium (Debian package chromium)"),
    pytest.mark.asyncio,
]


class Page:
    """One browser tab over the DevTools protocol."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.recv())
            if message.get("id") == call_id:
                assert "error" not in message, message
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str) -> Any:
        """Poll `expression` until it is truthy; fail after WAIT seconds with what the page shows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while loop.time() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"{expression} stayed false; the page shows: {await self.evaluate('document.body.innerText')}"
        )


@asynccontextmanager
async def chromium(profile: Path) -> AsyncIterator[Page]:
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=900,700",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        "about:blank",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        for _ in range(int(WAIT * 10)):
            if active.exists() and len(active.read_text().splitlines()) >= 2:
                break
            await asyncio.sleep(0.1)
        port = int(active.read_text().splitlines()[0])
        async with httpx.AsyncClient() as client:
            targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with connect(url, max_size=2**26) as ws:
            yield Page(ws)
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


TEXT = "Array.from(document.querySelectorAll('.m .text')).map(e => e.textContent).join('|')"
STATUS = "Array.from(document.querySelectorAll('.m')).map(e => e.dataset.status).join('|')"
PIECES = [f"tok{i} " for i in range(10)]


async def test_the_page_shows_text_as_it_arrives_and_resumes_after_a_restart(tmp_path: Path) -> None:
    port = free_port()
    env = server_env(CHATSESSIONS_STORE="sqlite", CHATSESSIONS_DATA_DIR=tmp_path / "data")
    base = f"http://127.0.0.1:{port}"
    async with chromium(tmp_path / "profile") as page:
        with running_server(env, port):
            async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
                sid = (await client.post("/v1/sessions", json={"title": "live demo"})).json()["id"]
                await page.call("Page.navigate", url=f"{base}/demo/live?session={sid}")
                await page.wait_for("document.body.dataset.state === 'live'")
                body = {"role": "assistant", "content": "", "status": "in_progress"}
                seq = (await client.post(f"/v1/sessions/{sid}/messages", json=body)).json()["seq"]
                deltas = f"/v1/sessions/{sid}/messages/{seq}/deltas"
                for i, piece in enumerate(PIECES[:5]):
                    assert (await client.post(deltas, json={"content": piece})).status_code == 200
                    # The text grows while the script is still streaming: before the next delta is sent.
                    await page.wait_for(f"{TEXT} === {''.join(PIECES[: i + 1])!r}")
        await page.wait_for("document.body.dataset.state === 'reconnecting'")
        with running_server(env, port):
            async with httpx.AsyncClient(base_url=base, timeout=WAIT) as client:
                for piece in PIECES[5:]:  # streamed while the page is still reconnecting
                    assert (await client.post(deltas, json={"content": piece})).status_code == 200
                done = await client.patch(f"/v1/sessions/{sid}/messages/{seq}", json={"status": "completed"})
                assert done.status_code == 200
                await page.wait_for(f"{STATUS} === 'completed'")
                shown = await page.evaluate(TEXT)
                reconnects = await page.evaluate("document.getElementById('reconnects').textContent")
                shot = await page.call("Page.captureScreenshot", format="png")
    assert shown == "".join(PIECES)  # every delta once, in order, none lost in the restart
    assert int(reconnects) >= 1
    screenshot = tmp_path / "live-demo.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    print(f"screenshot: {screenshot}")
