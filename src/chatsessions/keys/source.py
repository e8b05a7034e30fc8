"""The keys file as the running service sees it: read at start-up, re-read when it changes."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from chatsessions.keys.file import load_keys
from chatsessions.keys.model import KeyRing, KeysFileError

log = logging.getLogger("chatsessions")


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


class KeySource:
    """The keys file of a running service: read at start-up, re-read when it changes.

    At most once per `recheck_seconds` a request looks at the file's inode, mtime
    and size (in a worker thread) and reloads it when they moved, so `keys create`
    and `keys revoke` take effect without a restart. A file that turns missing or
    invalid while the service runs leaves it with no valid key (every request 401)
    until it is fixed: failing closed is the safe way to fail here.
    """

    def __init__(self, path: Path, ring: KeyRing, *, recheck_seconds: float) -> None:
        self.path = path
        self._ring = ring
        self._signature = _signature(path)
        self._recheck = recheck_seconds
        self._next_check = time.monotonic() + recheck_seconds

    @classmethod
    async def open(cls, path: Path, *, recheck_seconds: float = 1.0) -> KeySource:
        """Load the keys file; raises KeysFileError so that the service refuses to start."""
        ring = await asyncio.to_thread(load_keys, path)
        return cls(path, ring, recheck_seconds=recheck_seconds)

    @property
    def ring(self) -> KeyRing:
        return self._ring

    async def current(self) -> KeyRing:
        now = time.monotonic()
        if now < self._next_check:
            return self._ring
        # Set first, so that the requests arriving meanwhile use the ring they have.
        self._next_check = now + self._recheck
        signature = await asyncio.to_thread(_signature, self.path)
        if signature != self._signature:
            try:
                self._ring = await asyncio.to_thread(load_keys, self.path)
                log.info("keys file %s reloaded: %d active keys", self.path, self._ring.active_count)
            except KeysFileError as exc:
                self._ring = KeyRing()
                log.error("%s; every request is refused until it is fixed", exc)
            self._signature = signature
        return self._ring
