"""Helpers of the security tests: stores, tenants with keys, apps on the real lifespan, raw requests."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

import httpx
import pytest
from asgi_lifespan import LifespanManager

from chatsessions.config import Settings
from chatsessions.keys import create_key
from chatsessions.main import create_app
from tests.conftest import drop_postgres_schema, make_settings

STORES = ["memory", "sqlite", "postgres"]
JSON = {"content-type": "application/json"}
PROBLEM_JSON = "application/problem+json"


def store_settings(store: str, tmp_path: Path, **overrides: object) -> Settings:
    """Settings for `store`, skipping a backend that is not there yet (or has no server)."""
    module = {"postgres": "chatsessions.storage.postgres"}.get(store)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} does not exist yet")
    return make_settings(store, tmp_path, **overrides)


@dataclass(frozen=True, slots=True)
class Tenants:
    """A keys file with one key for each of two tenants."""

    keys_file: Path
    alice: dict[str, str]
    bob: dict[str, str]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_tenants(directory: Path) -> Tenants:
    directory.mkdir(parents=True, exist_ok=True)
    keys_file = directory / "keys.json"
    alice, _ = create_key(keys_file, tenant="alice")
    bob, _ = create_key(keys_file, tenant="bob")
    return Tenants(keys_file, bearer(alice), bearer(bob))


@dataclass(frozen=True, slots=True)
class RunningApp:
    client: httpx.AsyncClient
    asgi: Any  # the app as a server sees it, lifespan state included


@asynccontextmanager
async def running_app(settings: Settings, *, drop_schema: bool = True) -> AsyncIterator[RunningApp]:
    """A fresh app inside its lifespan, and a client on it; drops a PostgreSQL schema afterwards."""
    app = create_app(settings)
    try:
        async with (
            LifespanManager(app) as manager,
            httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://test") as client,
        ):
            yield RunningApp(client, manager.app)
    finally:
        if drop_schema:
            await drop_postgres_schema(settings)


@dataclass(frozen=True, slots=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def asgi_request(
    app: RunningApp, method: str, raw_path: bytes, headers: dict[str, str] | None = None
) -> RawResponse:
    """Send a request whose path httpx would normalise (`..`) straight to the app, as uvicorn would."""
    path, _, query = raw_path.partition(b"?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        # What uvicorn does: the path percent-decoded, the raw path as sent.
        "path": unquote(path.decode("ascii")),
        "raw_path": path,
        "root_path": "",
        "query_string": query,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app.asgi(scope, receive, send)
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    names = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.get("headers", [])}
    return RawResponse(cast(int, start["status"]), names, body)


def files_under(root: Path) -> set[Path]:
    return set(root.rglob("*")) if root.exists() else set()


# --- a real server ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Server:
    host: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return cast(int, sock.getsockname()[1])


def cli_env(**values: str) -> dict[str, str]:
    """The environment minus every CHATSESSIONS_* variable, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSIONS_")}
    env.update(values)
    return env


@contextmanager
def running_server(tmp_path: Path, *args: str, **env: str) -> Iterator[Server]:
    """`chatsessions serve` (uvloop + httptools, as in production) on a free loopback port."""
    port = _free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "chatsessions.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            env=cli_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not come up:\n{log.read_text()}")
                time.sleep(0.05)
            yield Server("127.0.0.1", port, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
