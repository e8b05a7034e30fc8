"""Bounded LRU of read indexes: message offsets and the newest messages per session."""

from __future__ import annotations

import itertools
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from chatsessions.models import Message

TAIL_MESSAGES = 128  # recent messages kept per cached session ...
TAIL_BYTES = 256 * 1024  # ... within this many bytes


@dataclass(slots=True)
class ReadIndex:
    """Offsets of the live messages of one session log, valid up to `indexed_size`,
    and the most recent messages themselves (the tail a chat client reads most)."""

    generation: int
    first_live: int
    offsets: array[int]
    indexed_size: int
    tail: deque[Message] = field(default_factory=deque)
    tail_bytes: int = 0

    @property
    def cost(self) -> int:
        return 256 + 8 * len(self.offsets) + self.tail_bytes

    def remember(self, messages: list[Message]) -> None:
        """Append the newest messages to the tail (they must continue it), then trim it."""
        for message in messages:
            if self.tail and self.tail[-1].seq + 1 != message.seq:
                self.tail.clear()
                self.tail_bytes = 0
            self.tail.append(message)
            self.tail_bytes += _message_cost(message)
        while self.tail and (len(self.tail) > TAIL_MESSAGES or self.tail_bytes > TAIL_BYTES):
            self.tail_bytes -= _message_cost(self.tail.popleft())

    def from_tail(self, first: int, last: int) -> list[Message] | None:
        if not self.tail or first < self.tail[0].seq or last > self.tail[-1].seq:
            return None
        start = first - self.tail[0].seq
        return list(itertools.islice(self.tail, start, start + last - first + 1))


def _message_cost(message: Message) -> int:
    # Rough resident size: the content dominates; metadata and references are bounded.
    return (
        400
        + len(message.content)
        + (0 if message.metadata is None else 256)
        + (0 if message.references is None else 256)
    )


class ReadCache:
    """Bounded LRU of read indexes, by count and by bytes."""

    def __init__(self, *, max_items: int, max_bytes: int) -> None:
        self._items: OrderedDict[str, ReadIndex] = OrderedDict()
        self._bytes = 0
        self._max_items = max_items
        self._max_bytes = max_bytes

    def get(self, fname: str) -> ReadIndex | None:
        index = self._items.get(fname)
        if index is not None:
            self._items.move_to_end(fname)
        return index

    def put(self, fname: str, index: ReadIndex) -> None:
        self.drop(fname)
        self._items[fname] = index
        self._bytes += index.cost
        while self._items and (len(self._items) > self._max_items or self._bytes > self._max_bytes):
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.cost

    def drop(self, fname: str) -> None:
        old = self._items.pop(fname, None)
        if old is not None:
            self._bytes -= old.cost

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes


# --- the write path -------------------------------------------------------
