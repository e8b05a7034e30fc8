"""uvicorn's httptools protocol with a deadline for request headers (`chatsessions serve` runs it).

uvicorn arms its keep-alive timeout only once a response is complete, and data
arriving cancels it: a client that opens a connection and sends its headers a
byte at a time (slowloris) holds the connection and a descriptor for ever. This
protocol closes a connection whose request headers are not complete within the
keep-alive timeout (`CHATSESSIONS_KEEP_ALIVE_TIMEOUT_SECONDS`) of the connection
opening or the previous request beginning: such a connection is as good as idle.
A body that stalls is `BodyLimitMiddleware`'s business (408).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderDeadlineProtocol(HttpToolsProtocol):
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_deadline = self.loop.call_later(self.timeout_keep_alive, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
