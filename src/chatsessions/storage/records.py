"""Framing of log records: a checksum per record, torn-tail detection.

A frame is `<u32 length><u32 crc32>` followed by `length` bytes of body. The
body starts with a fixed binary prefix (kind, version, seq, count, updated_at
in microseconds) so that loading a log reads counters without parsing JSON;
the rest of the body is JSON.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

FRAME: Final = struct.Struct("<II")
PREFIX: Final = struct.Struct("<BQQIq")
MAX_FRAME: Final = 1 << 30
# Longest tail one interrupted group commit can leave; a bad frame further from
# the end than this cannot be a torn write.
MAX_TORN_TAIL: Final = 64 << 20


class Kind(IntEnum):
    CREATED = 1  # body: tenant + session head; seq = last_seq (0 when new)
    SNAPSHOT = 2  # body: session head after compaction; seq = last_seq, no live messages
    MESSAGES = 3  # body: list of messages; seq = first seq, count = how many
    PATCHED = 4  # body: session head after the patch
    CLEARED = 5  # no body; seq = last_seq at the clear
    DELETED = 6  # write-ahead log only


@dataclass(frozen=True, slots=True)
class Record:
    offset: int
    end: int
    kind: Kind
    version: int
    seq: int
    count: int
    updated_us: int
    body: memoryview  # the JSON part


class Corrupted(Exception):
    """A record failed its checksum with intact data after it: not a torn tail."""

    def __init__(self, offset: int) -> None:
        super().__init__(f"corrupt record at byte {offset}")
        self.offset = offset


def encode(kind: Kind, *, version: int, seq: int = 0, count: int = 0, updated_us: int = 0, body: bytes = b"") -> bytes:
    payload = PREFIX.pack(kind, version, seq, count, updated_us) + body
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def encode_raw(payload: bytes) -> bytes:
    """Frame an opaque payload (the write-ahead log's entries)."""
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def scan_raw(data: bytes | memoryview, start: int = 0) -> tuple[list[tuple[int, memoryview]], int]:
    """Every intact frame from `start`, and the offset where the valid log ends.

    A frame that is cut short or fails its checksum at the end of the data is a
    torn tail: scanning stops before it. One that fails with valid data after
    it raises `Corrupted`.
    """
    view = memoryview(data)
    total = len(view)
    frames: list[tuple[int, memoryview]] = []
    offset = start
    while offset < total:
        if total - offset < FRAME.size:
            break
        length, crc = FRAME.unpack_from(view, offset)
        end = offset + FRAME.size + length
        if length == 0 or length > MAX_FRAME or end > total:
            if _looks_torn(view, offset, total):
                break
            raise Corrupted(offset)
        payload = view[offset + FRAME.size : end]
        if zlib.crc32(payload) != crc:
            if _looks_torn(view, offset, total):
                break
            raise Corrupted(offset)
        frames.append((offset, payload))
        offset = end
    return frames, offset


def _looks_torn(view: memoryview, offset: int, total: int) -> bool:
    """A torn write is the last thing in a log: no intact frame may follow it.

    A bad frame followed by an intact one is damage in the middle (a flipped
    bit, a lost block), which must be reported rather than cut off.
    """
    if total - offset > MAX_TORN_TAIL:
        return False
    for start in range(offset + 1, total - FRAME.size):
        length, crc = FRAME.unpack_from(view, start)
        end = start + FRAME.size + length
        if length > 0 and end <= total and zlib.crc32(view[start + FRAME.size : end]) == crc:
            return False
    return True


def decode(data: bytes | memoryview, start: int = 0) -> tuple[list[Record], int]:
    """Every intact record from `start` and where the valid log ends (see `scan_raw`)."""
    frames, valid_end = scan_raw(data, start)
    records = []
    for offset, payload in frames:
        kind, version, seq, count, updated_us = PREFIX.unpack_from(payload)
        records.append(
            Record(
                offset=offset,
                end=offset + FRAME.size + len(payload),
                kind=Kind(kind),
                version=version,
                seq=seq,
                count=count,
                updated_us=updated_us,
                body=payload[PREFIX.size :],
            )
        )
    return records, valid_end
