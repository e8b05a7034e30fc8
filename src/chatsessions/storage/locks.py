"""Per-key asyncio locks, created on demand and dropped when nobody holds or awaits them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedLocks:
    """One lock per key. The registry is a plain dict: the event loop runs one
    coroutine at a time and no await happens between lookup and insert, so the
    dict needs no lock of its own, and no lock is ever held across disk I/O
    except the per-key one, by design."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock_, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock_, users - 1)

    async def wait_turn(self, key: str) -> None:
        """Return once everyone who holds or awaits `key` now is done with it.

        For a critical section that never awaits: run it right after this returns,
        without an await in between, and it is serialised with the holders of
        `key` at no cost when nobody holds it (awaiting a coroutine that does not
        suspend does not yield to the event loop).
        """
        if key in self._locks:
            async with self.hold(key):
                pass

    def __len__(self) -> int:
        return len(self._locks)
