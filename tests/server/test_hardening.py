"""Slow and many clients against the real `chatsessions serve` process.

- Connections trickling their headers are closed after the keep-alive timeout and,
  while 1,000 of them are open, /healthz still answers (1 s client timeout).
- A body that does not arrive within CHATSESSIONS_BODY_TIMEOUT_SECONDS: 408, then the
  connection is closed.
- Past CHATSESSIONS_MAX_CONNECTIONS: 503.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.server.proc import RunningServer, free_port, running_server, serve_command, server_env

pytestmark = pytest.mark.slow


@contextmanager
def serve(tmp_path: Path, **variables: str) -> Iterator[RunningServer]:
    port = free_port()
    env = server_env(CHATSESSIONS_STORE="memory", CHATSESSIONS_DATA_DIR=tmp_path / "data", **variables)
    with running_server(env, port, cwd=tmp_path, command=serve_command(port)) as server:
        yield server


def connect(server: RunningServer) -> socket.socket:
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection; raises TimeoutError if it does not."""
    sock.settimeout(seconds)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_healthz_answers_while_1000_connections_trickle_headers_and_they_are_cut(tmp_path: Path) -> None:
    with serve(tmp_path, CHATSESSIONS_KEEP_ALIVE_TIMEOUT_SECONDS="3") as server, ExitStack() as stack:
        slow = []
        for _ in range(1000):
            sock = stack.enter_context(connect(server))
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(sock)
        for sock in slow[:50]:  # still trickling
            sock.sendall(b"a")
        started = time.monotonic()
        healthz = httpx.get(f"{server.base_url}/healthz", timeout=1.0)
        assert healthz.status_code == 200
        # The keep-alive timeout (3 s) also bounds the headers: every slow connection is closed, none answered.
        for sock in slow:
            assert read_until_closed(sock, max(1.0, 30 - (time.monotonic() - started))) == b""
        assert httpx.get(f"{server.base_url}/healthz", timeout=1.0).status_code == 200


def test_a_body_that_does_not_arrive_in_time_is_408_and_the_connection_closed(tmp_path: Path) -> None:
    with serve(tmp_path, CHATSESSIONS_BODY_TIMEOUT_SECONDS="1") as server:
        assert httpx.post(f"{server.base_url}/v1/sessions", json={"id": "s"}, timeout=10).status_code == 201
        with connect(server) as sock:
            sock.sendall(
                b"POST /v1/sessions/s/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"role": '
            )
            answer = read_until_closed(sock, 30)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in head.lower()
        assert b"application/problem+json" in head
        assert b"did not arrive within 1 s" in body
        page = httpx.get(f"{server.base_url}/v1/sessions/s/messages", timeout=10).json()
        assert page["items"] == []  # nothing half-read was appended


def test_past_max_connections_requests_get_503(tmp_path: Path) -> None:
    with serve(tmp_path, CHATSESSIONS_MAX_CONNECTIONS="4") as server, ExitStack() as stack:
        held = []
        for _ in range(4):  # keep-alive connections, each after a complete request
            client = stack.enter_context(httpx.Client(base_url=server.base_url, timeout=10))
            assert client.get("/healthz").status_code == 200
            held.append(client)
        refused = httpx.get(f"{server.base_url}/healthz", timeout=10)
        assert refused.status_code == 503
        for client in held:
            client.close()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.base_url}/healthz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the limit never let requests in again"
            time.sleep(0.1)
