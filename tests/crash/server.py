"""The real server in a child process: start it on a free port, wait for /healthz, kill it with SIGKILL."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from tests.server.proc import uvicorn_command


class ServerFailed(Exception):
    """The server exited or never answered /healthz; the message carries its log."""


@dataclass(slots=True)
class Server:
    process: asyncio.subprocess.Process
    base_url: str
    log_path: Path
    start_seconds: float  # process start -> first 200 from /healthz

    async def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, the page cache keeps what was written."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        """SIGTERM and wait: the clean shutdown path (the writer commits what is queued, SQLite checkpoints)."""
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _open_log(path: Path) -> IO[bytes]:
    return path.open("ab")


def _log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _log_tail(path: Path, start: int) -> str:
    with path.open("rb") as log_file:
        log_file.seek(start)
        return log_file.read().decode(errors="replace")[-4000:]


def server_env(data_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHATSESSIONS_")}
    env.update(
        {
            "CHATSESSIONS_STORE": "sqlite",
            "CHATSESSIONS_DATA_DIR": str(data_dir),
            "CHATSESSIONS_FSYNC": "always",
            **(extra or {}),
        }
    )
    return env


async def start_server(
    data_dir: Path, log_path: Path, *, env: Mapping[str, str] | None = None, wait_seconds: float = 60.0
) -> Server:
    """Start uvicorn on `data_dir` and return once /healthz answers 200."""
    last_error = ""
    for _ in range(5):  # another process may grab the free port between probe and bind
        port = free_port()
        log_start = _log_size(log_path)
        log_file = _open_log(log_path)
        started = time.perf_counter()
        try:
            process = await asyncio.create_subprocess_exec(
                *uvicorn_command(port),
                "--log-level",
                "warning",
                env=server_env(data_dir, env),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        finally:
            log_file.close()
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=2.0, verify=False) as client:
            while time.perf_counter() - started < wait_seconds and process.returncode is None:
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        return Server(process, base_url, log_path, time.perf_counter() - started)
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.01)
        if process.returncode is None:
            process.kill()
        await process.wait()
        last_error = _log_tail(log_path, log_start)
        if "address already in use" not in last_error.lower():
            break
    raise ServerFailed(f"the server on {data_dir} did not become healthy:\n{last_error}")


@asynccontextmanager
async def running_server(
    data_dir: Path, log_path: Path, *, env: Mapping[str, str] | None = None
) -> AsyncIterator[Server]:
    server = await start_server(data_dir, log_path, env=env)
    try:
        yield server
    finally:
        await server.stop()
