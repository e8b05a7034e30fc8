"""Reads: read-only connections, one per thread of a small pool.

WAL mode lets these read while the writer writes: a read sees the last
commit that finished before it began, never waits for the writer, and never
makes the writer wait. The event loop only hands work to the pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import apsw

from chatsessions.errors import StorageCorrupted, StorageUnavailable

T = TypeVar("T")
Read = Callable[[apsw.Connection], T]


class Readers:
    """A thread pool whose threads each own one read-only connection."""

    def __init__(self, connect: Callable[[], apsw.Connection], *, threads: int) -> None:
        self._connect = connect
        self._local = threading.local()
        self._connections: list[apsw.Connection] = []
        self._lock = threading.Lock()  # guards `_connections`, appended to from the pool's threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="chatsessions-reader")

    async def run(self, read: Read[T]) -> T:
        """Run `read` on a read-only connection, in one read transaction."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._in_thread, read)

    def _in_thread(self, read: Read[T]) -> T:
        conn: apsw.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        try:
            with conn:  # one snapshot for every statement of the read
                result = read(conn)
        except apsw.CorruptError as exc:
            raise StorageCorrupted(f"the database is corrupt ({exc})") from exc
        except apsw.Error as exc:
            raise StorageUnavailable(f"a read failed ({type(exc).__name__}: {exc})") from exc
        return result

    async def aclose(self) -> None:
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
