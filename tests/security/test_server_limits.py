"""The body limit and hostile paths against the real server (uvicorn, httptools, uvloop), over raw sockets.

In-process tests cannot show what the HTTP server does with a chunked body, a
lying Content-Length or an undecoded path; these can. Requests use raw sockets
so that nothing normalises the path or buffers the body on the way.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.security.support import Server, make_tenants, running_server

LIMIT = 4 * 2**20  # the default `max_body_bytes`


@dataclass(frozen=True, slots=True)
class Live:
    server: Server
    auth: str  # an Authorization header value


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp_path = tmp_path_factory.mktemp("server")
    tenants = make_tenants(tmp_path / "keys")
    with running_server(tmp_path, CHATSESSIONS_STORE="memory", CHATSESSIONS_KEYS_FILE=str(tenants.keys_file)) as server:
        with httpx.Client(base_url=server.url, headers=tenants.alice, timeout=30) as client:
            assert client.put("/v1/sessions/s1").status_code == 201
        yield Live(server, tenants.alice["Authorization"])


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(server: Server, head: str, body: Iterable[bytes] = ()) -> Answer:
    """Send a request head and body pieces; read the answer until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1"))
        try:
            for piece in body:
                sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early and closed; its answer is already on the way
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    status_line, _, rest = data.partition(b"\r\n")
    raw_headers, _, payload = rest.partition(b"\r\n\r\n")
    headers = {}
    for line in raw_headers.split(b"\r\n"):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, payload)


def request_head(method: str, path: str, auth: str | None, *headers: str) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers]
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    return "\r\n".join(lines) + "\r\n\r\n"


def chunked(total: int, *, prefix: bytes = b"", piece: int = 65536) -> Iterator[bytes]:
    """`total` bytes of body after `prefix`, in chunked transfer encoding."""
    if prefix:
        yield b"%x\r\n%s\r\n" % (len(prefix), prefix)
    left = total
    while left:
        size = min(piece, left)
        left -= size
        yield b"%x\r\n%s\r\n" % (size, b"x" * size)
    yield b"0\r\n\r\n"


def assert_problem(answer: Answer, status: int) -> None:
    assert answer.status == status, answer.body[:300]
    assert answer.headers["content-type"] == "application/problem+json"
    assert json.loads(answer.body)["status"] == status


def healthy(live: Live) -> None:
    answer = exchange(live.server, request_head("GET", "/v1/sessions/s1", live.auth))
    assert answer.status == 200


def test_a_chunked_body_over_the_limit_is_413(live: Live) -> None:
    head = request_head(
        "POST", "/v1/sessions/s1/messages", live.auth, "Content-Type: application/json", "Transfer-Encoding: chunked"
    )
    prefix = b'{"role": "user", "content": "'
    answer = exchange(live.server, head, chunked(LIMIT + 1 - len(prefix), prefix=prefix))
    assert_problem(answer, 413)
    healthy(live)


def test_a_long_chunked_stream_is_cut_at_the_limit(live: Live) -> None:
    head = request_head(
        "POST", "/v1/sessions", live.auth, "Content-Type: application/json", "Transfer-Encoding: chunked"
    )
    answer = exchange(live.server, head, chunked(5 * LIMIT))
    assert_problem(answer, 413)
    healthy(live)


def test_a_chunked_body_within_the_limit_works(live: Live) -> None:
    head = request_head(
        "POST",
        "/v1/sessions/s1/messages/batch",
        live.auth,
        "Content-Type: application/json",
        "Transfer-Encoding: chunked",
    )
    # Three messages of almost the largest content: about 3 MiB in 50 kB chunks.
    message = {"role": "user", "content": "c" * (2**20 - 1)}
    body = json.dumps({"messages": [message] * 3}).encode()
    pieces = [b"%x\r\n%s\r\n" % (len(body[i : i + 50_000]), body[i : i + 50_000]) for i in range(0, len(body), 50_000)]
    answer = exchange(live.server, head, [*pieces, b"0\r\n\r\n"])
    assert answer.status == 201, answer.body[:300]


def test_a_declared_length_over_the_limit_is_413_before_any_byte(live: Live) -> None:
    """No body is sent at all: the answer cannot wait for it."""
    head = request_head(
        "POST", "/v1/sessions/s1/messages", live.auth, "Content-Type: application/json", f"Content-Length: {LIMIT + 1}"
    )
    assert_problem(exchange(live.server, head), 413)
    healthy(live)


def test_a_4_mib_plus_body_is_413(live: Live) -> None:
    body = json.dumps({"role": "user", "content": "x" * LIMIT}).encode()
    head = request_head(
        "POST", "/v1/sessions/s1/messages", live.auth, "Content-Type: application/json", f"Content-Length: {len(body)}"
    )
    assert_problem(exchange(live.server, head, [body]), 413)
    healthy(live)


@pytest.mark.parametrize("open_", [b"[", b'{"a":'])
def test_a_100k_deep_body_is_4xx(live: Live, open_: bytes) -> None:
    depth = 100_000
    close = b"]" if open_ == b"[" else b"}"
    body = open_ * depth + (b"" if open_ == b"[" else b"1") + close * depth
    for path in ("/v1/sessions", "/v1/sessions/s1/messages", "/v1/sessions/s1/messages/batch"):
        head = request_head("POST", path, live.auth, "Content-Type: application/json", f"Content-Length: {len(body)}")
        answer = exchange(live.server, head, [body])
        assert answer.status in (400, 422), (path, answer.body[:300])
    healthy(live)


RAW_PATHS = [
    "/v1/sessions/..",
    "/v1/sessions/%2e%2e",
    "/v1/sessions/%2e%2e/%2e%2e/etc/passwd",
    "/v1/sessions/../../etc/passwd",
    "/v1/sessions/a%2Fb",
    "/v1/sessions/a%2fb/messages",
    "/v1/sessions/%00",
    "/v1/sessions/s1%00/messages",
    "/v1/sessions/%E2%80%AEs1",
    "/v1/sessions/" + "a" * 300,
    "/v1/sessions/CON/messages/1",
]


@pytest.mark.parametrize("path", RAW_PATHS)
def test_hostile_paths_are_4xx(live: Live, path: str, tmp_path: Path) -> None:
    for method in ("GET", "DELETE", "PATCH"):
        answer = exchange(live.server, request_head(method, path, live.auth, "Content-Length: 0"))
        assert 400 <= answer.status < 500, (method, path, answer.status, answer.body[:200])
        assert answer.status != 401
        # Without a key the answer is 401, whatever the path says.
        answer = exchange(live.server, request_head(method, path, None, "Content-Length: 0"))
        assert answer.status == 401, (method, path)


@pytest.mark.parametrize("path", ["/v1/../healthz", "/healthz/../v1/sessions", "/healthz/%2e%2e/v1/sessions"])
def test_dot_segments_cannot_reach_around_authentication(live: Live, path: str) -> None:
    answer = exchange(live.server, request_head("GET", path, None))
    assert answer.status == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
