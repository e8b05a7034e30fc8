"""Run the real service in a uvicorn subprocess, for behaviour that lives in the process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_SECONDS = 30.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(**variables: str | os.PathLike[str]) -> dict[str, str]:
    """The test process environment without any CHATSESSIONS_* variable, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATSESSIONS_")}
    env.update({k: os.fspath(v) for k, v in variables.items()})
    return env


def uvicorn_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "chatsessions.main:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


def serve_command(port: int) -> list[str]:
    """`chatsessions serve` itself: the protocol, limits and timeouts it sets up come along."""
    return [sys.executable, "-m", "chatsessions.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    base_url: str
    log: Path

    def output(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace")


def _wait_until_healthy(server: RunningServer) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with {server.process.returncode} before answering:\n{server.output()}"
            )
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the server did not answer /healthz within {STARTUP_SECONDS:.0f} s:\n{server.output()}")


@contextmanager
def running_server(
    env: Mapping[str, str], port: int, *, cwd: Path | None = None, command: list[str] | None = None
) -> Iterator[RunningServer]:
    """Start `uvicorn chatsessions.main:create_app --factory` (or `command`) on `port`, wait for /healthz,
    stop it on exit.

    The server's output goes to a temporary file (a pipe nobody reads could fill and block it).
    """
    with tempfile.TemporaryDirectory(prefix="chatsessions-server-") as scratch:
        log = Path(scratch) / "server.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                command or uvicorn_command(port),
                env=dict(env),
                cwd=cwd or scratch,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        server = RunningServer(process, f"http://127.0.0.1:{port}", log)
        try:
            _wait_until_healthy(server)
            yield server
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
