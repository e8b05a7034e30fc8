"""Behaviour of the real server process: one owner per data directory, body limits on the wire."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.server.proc import RunningServer, free_port, running_server, server_env, uvicorn_command

CHATSESSIONS = str(Path(sys.executable).parent / "chatsessions")
MAX_BODY_BYTES = 1024


@dataclass(frozen=True)
class Owner:
    """A server that owns `data_dir`, started with a small body limit."""

    server: RunningServer
    env: dict[str, str]
    data_dir: Path
    cwd: Path


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Owner]:
    cwd = tmp_path_factory.mktemp("server")
    data_dir = cwd / "data"
    env = server_env(
        CHATSESSIONS_STORE="sqlite", CHATSESSIONS_DATA_DIR=data_dir, CHATSESSIONS_MAX_BODY_BYTES=str(MAX_BODY_BYTES)
    )
    with running_server(env, free_port(), cwd=cwd) as server:
        yield Owner(server, env, data_dir, cwd)


def assert_refused_for_the_lock(completed: subprocess.CompletedProcess[bytes], data_dir: Path) -> str:
    stderr = completed.stderr.decode(errors="replace")
    assert completed.returncode != 0, stderr
    assert "lock" in stderr.lower(), stderr
    assert str(data_dir) in stderr, stderr
    return stderr


def test_second_server_on_the_same_data_dir_refuses_to_start(owner: Owner) -> None:
    base = owner.server.base_url
    assert httpx.post(f"{base}/v1/sessions", json={"id": "kept"}, timeout=10).status_code == 201
    appended = httpx.post(f"{base}/v1/sessions/kept/messages", json={"role": "user", "content": "hi"}, timeout=10)
    assert appended.status_code == 201

    second = subprocess.run(
        uvicorn_command(free_port()), env=owner.env, cwd=owner.cwd, capture_output=True, timeout=60, check=False
    )
    assert_refused_for_the_lock(second, owner.data_dir)

    # The refused process touched nothing: the owner still serves everything it had.
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    page = httpx.get(f"{base}/v1/sessions/kept/messages", timeout=10).json()
    assert [m["content"] for m in page["items"]] == ["hi"]


def test_second_serve_command_on_the_same_data_dir_refuses_with_a_clear_message(owner: Owner) -> None:
    second = subprocess.run(
        [CHATSESSIONS, "serve", "--port", str(free_port())],
        env=owner.env,
        cwd=owner.cwd,
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = assert_refused_for_the_lock(second, owner.data_dir)
    assert "Traceback" not in stderr, stderr
    assert httpx.get(f"{owner.server.base_url}/readyz", timeout=10).status_code == 200


def test_check_on_a_live_data_dir_checks_it_beside_the_server(owner: Owner) -> None:
    # `check` reads the database read-only (PRAGMA integrity_check) and takes no lock.
    done = subprocess.run(
        [CHATSESSIONS, "check"], env=owner.env, cwd=owner.cwd, capture_output=True, timeout=60, check=False
    )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert done.stdout.decode() == "chatsessions: configuration and sqlite store OK\n"


def test_serve_with_two_workers_on_the_sqlite_store_refuses(tmp_path: Path) -> None:
    env = server_env(CHATSESSIONS_STORE="sqlite", CHATSESSIONS_DATA_DIR=tmp_path / "data")
    completed = subprocess.run(
        [CHATSESSIONS, "serve", "--port", str(free_port()), "--workers", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
        check=False,
    )
    stderr = completed.stderr.decode(errors="replace")
    assert completed.returncode != 0, stderr
    assert "postgres" in stderr.lower(), stderr


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(owner: Owner) -> None:
    base = owner.server.base_url
    port = int(base.rsplit(":", 1)[1])
    assert httpx.post(f"{base}/v1/sessions", json={"id": "limited"}, timeout=10).status_code == 201
    # Announce a gigabyte and send none of it: a server that waited for the body would never answer.
    request = (
        "POST /v1/sessions/limited/messages HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Content-Type: application/json\r\n"
        "Content-Length: 1000000000\r\n"
        "\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed without an answer: {head!r}"
            head += chunk
    status_line, _, headers = head.partition(b"\r\n")
    assert status_line.split()[1] == b"413", head
    assert b"application/problem+json" in headers.lower(), head

    session = httpx.get(f"{base}/v1/sessions/limited", timeout=10).json()
    assert (session["message_count"], session["version"]) == (0, 1)


def test_chunked_body_over_the_limit_is_413(owner: Owner) -> None:
    base = owner.server.base_url
    assert httpx.post(f"{base}/v1/sessions", json={"id": "chunked"}, timeout=10).status_code == 201
    body = b'{"role": "user", "content": "' + b"x" * (4 * MAX_BODY_BYTES) + b'"}'

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 256):
            yield body[start : start + 256]

    response = httpx.post(
        f"{base}/v1/sessions/chunked/messages",
        content=chunks(),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    session = httpx.get(f"{base}/v1/sessions/chunked", timeout=10).json()
    assert (session["message_count"], session["version"]) == (0, 1)
