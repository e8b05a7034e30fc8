"""Retries of the client: a dropped connection against a real uvicorn process, 503/507 with Retry-After.

The proxy between client and server forwards a request, waits until the server
has answered it (so the change is committed), then closes the connection before
the answer reaches the client: exactly the failure in which a naive retry would
append twice. The automatic Idempotency-Key makes the retry replay the answer.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp, Receive, Scope, Send

from chatsessions.client import (
    NO_RETRIES,
    AsyncChatSessions,
    ChatSessions,
    RetryPolicy,
    Unavailable,
)
from chatsessions.config import Settings
from chatsessions.main import create_app
from tests.server.proc import free_port, running_server, server_env


class DroppingProxy:
    """A TCP proxy to 127.0.0.1:`upstream`; the next `drop` connections lose the server's answer."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.drop = 0
        self.dropped = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                dropping = self.drop > 0
                self.drop -= dropping
            target = self._lose_answer if dropping else self._forward
            threading.Thread(target=target, args=(client,), daemon=True).start()

    def _lose_answer(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as server:
            server.sendall(_read_request(client))
            server.recv(1)  # the server answers only after the change is durable
            with self._lock:
                self.dropped += 1
        # Both sockets close here: the client never sees a byte of the answer.

    def _forward(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as server:
            answers = threading.Thread(target=_pump, args=(server, client), daemon=True)
            answers.start()
            _pump(client, server)
            answers.join()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until either side closes, then shut both down (the other pump ends too)."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _read_request(sock: socket.socket) -> bytes:
    """One whole HTTP/1.1 request with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DroppingProxy]:
    data_dir = tmp_path_factory.mktemp("client-retries")
    port = free_port()
    with running_server(server_env(CHATSESSIONS_DATA_DIR=data_dir), port):
        dropping = DroppingProxy(port)
        try:
            yield dropping
        finally:
            dropping.close()


def _no_keepalive(url: str) -> dict[str, Any]:
    # A fresh connection for every request: the proxy decides per connection.
    return {"base_url": url, "limits": httpx.Limits(max_keepalive_connections=0), "timeout": 10.0}


def test_a_retry_after_a_dropped_connection_appends_once(proxy: DroppingProxy) -> None:
    retries: list[str] = []
    policy = RetryPolicy(backoff=0.01, on_retry=lambda attempt, delay, reason: retries.append(reason))
    with httpx.Client(**_no_keepalive(proxy.url)) as http, ChatSessions(http=http, retry=policy) as chats:
        session = chats.create_session(id="sync-drop")
        proxy.drop, before = 1, proxy.dropped
        message = chats.append_message(session.id, role="user", content="exactly once")
        proxy.drop = 1
        batch = chats.append_messages(
            session.id, [{"role": "user", "content": "b1"}, {"role": "user", "content": "b2"}]
        )
        assert proxy.dropped == before + 2
        assert len(retries) == 2
        assert "RemoteProtocolError" in retries[0]
        assert message.seq == 1
        assert [m.seq for m in batch] == [2, 3]
        assert [m.content for m in chats.iter_messages(session.id)] == ["exactly once", "b1", "b2"]
        current = chats.get_session(session.id)
        assert current is not None
        assert (current.message_count, current.version) == (3, 3)


def test_without_retries_the_drop_is_unavailable_though_the_append_landed(proxy: DroppingProxy) -> None:
    with httpx.Client(**_no_keepalive(proxy.url)) as http, ChatSessions(http=http, retry=NO_RETRIES) as chats:
        chats.create_session(id="sync-no-retry")
        proxy.drop = 1
        with pytest.raises(Unavailable) as caught:
            chats.append_message("sync-no-retry", role="user", content="landed")
        assert caught.value.status is None
        assert [m.content for m in chats.iter_messages("sync-no-retry")] == ["landed"]


@pytest.mark.asyncio
async def test_the_async_client_retries_a_dropped_connection_once(proxy: DroppingProxy) -> None:
    policy = RetryPolicy(backoff=0.01)
    async with (
        httpx.AsyncClient(**_no_keepalive(proxy.url)) as http,
        AsyncChatSessions(http=http, retry=policy) as chats,
    ):
        await chats.create_session(id="async-drop")
        proxy.drop = 1
        created = await chats.create_session(id="async-drop-2")  # a create is keyed too
        proxy.drop = 1
        message = await chats.append_message("async-drop", role="user", content="once")
        assert (created.id, message.seq) == ("async-drop-2", 1)
        assert [m.content async for m in chats.iter_messages("async-drop")] == ["once"]


def test_a_refused_connection_is_retried_then_unavailable() -> None:
    retries: list[int] = []
    policy = RetryPolicy(attempts=3, backoff=0.01, on_retry=lambda attempt, delay, reason: retries.append(attempt))
    with ChatSessions(f"http://127.0.0.1:{free_port()}", retry=policy) as chats, pytest.raises(Unavailable):
        chats.get_session("s")
    assert retries == [1, 2]


class Refusing:
    """ASGI: answers the first `times` requests with `status` and a Retry-After, then lets `app` answer."""

    def __init__(self, app: ASGIApp, *, status: int, times: int, retry_after: str) -> None:
        self.app, self.status, self.times, self.retry_after = app, status, times, retry_after
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.refused >= self.times:
            await self.app(scope, receive, send)
            return
        self.refused += 1
        body = b'{"type":"about:blank","title":"Unavailable","status":503,"detail":"try later"}'
        headers = [(b"content-type", b"application/problem+json"), (b"retry-after", self.retry_after.encode())]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest_asyncio.fixture
async def real_app(settings: Settings) -> AsyncIterator[ASGIApp]:
    async with LifespanManager(create_app(settings)) as manager:
        yield manager.app


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [503, 507])
async def test_503_and_507_are_retried_after_their_retry_after(real_app: ASGIApp, status: int) -> None:
    refusing = Refusing(real_app, status=status, times=2, retry_after="0.05")
    delays: list[float] = []
    policy = RetryPolicy(on_retry=lambda attempt, delay, reason: delays.append(delay))
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(refusing), base_url="http://test") as http,
        AsyncChatSessions(http=http, retry=policy) as chats,
    ):
        session = await chats.create_session(id="s")
        assert session.id == "s"
        assert delays == [0.05, 0.05]
        refusing.refused, refusing.times = 0, 10
        with pytest.raises(Unavailable) as caught:
            await chats.append_message("s", role="user", content="x")
        assert caught.value.status == status
        assert caught.value.retry_after == 0.05
        assert refusing.refused == policy.attempts


def test_retry_after_is_capped_and_backoff_grows_within_bounds() -> None:
    policy = RetryPolicy(backoff=0.5, max_delay=3.0)
    assert policy.delay(0, 120.0) == 3.0
    assert policy.delay(5, 0.0) == 0.0
    for attempt in range(6):
        assert 0 <= policy.delay(attempt, None) <= min(3.0, 0.5 * 2**attempt)
