"""In-process table of Idempotency-Keys, shared by the memory and file backends."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from chatsessions.errors import IdempotencyInProgress, IdempotencyKeyReused
from chatsessions.models import StoredResponse


@dataclass(slots=True)
class IdempotencyEntry:
    fingerprint: str
    response: StoredResponse | None  # None while the first request runs
    expires_at: float  # wall-clock seconds


class IdempotencyTable:
    """Keys per tenant, kept at least `ttl` seconds after their answer was stored."""

    def __init__(self, *, ttl: float) -> None:
        self._ttl = ttl
        self._entries: OrderedDict[tuple[str, str], IdempotencyEntry] = OrderedDict()

    def begin(self, tenant: str, key: str, fingerprint: str) -> StoredResponse | None:
        self._purge()
        entry = self._entries.get((tenant, key))
        if entry is None:
            self._entries[(tenant, key)] = IdempotencyEntry(fingerprint, None, time.time() + self._ttl)
            return None
        if entry.fingerprint != fingerprint:
            raise IdempotencyKeyReused()
        if entry.response is None:
            raise IdempotencyInProgress()
        return entry.response

    def finish(self, tenant: str, key: str, response: StoredResponse | None, *, fingerprint: str | None = None) -> None:
        entry = self._entries.pop((tenant, key), None)
        if response is None:
            return
        fp = fingerprint if fingerprint is not None else (entry.fingerprint if entry else "")
        self._entries[(tenant, key)] = IdempotencyEntry(fp, response, time.time() + self._ttl)

    def restore(self, tenant: str, key: str, entry: IdempotencyEntry) -> None:
        if entry.expires_at > time.time() and entry.response is not None:
            self._entries[(tenant, key)] = entry
            self._entries.move_to_end((tenant, key))

    def completed(self) -> Iterator[tuple[str, str, IdempotencyEntry]]:
        for (tenant, key), entry in self._entries.items():
            if entry.response is not None:
                yield tenant, key, entry

    def __len__(self) -> int:
        return len(self._entries)

    def _purge(self) -> None:
        now = time.time()
        while self._entries:
            (tk, entry) = next(iter(self._entries.items()))
            if entry.expires_at > now or entry.response is None:
                break
            del self._entries[tk]
