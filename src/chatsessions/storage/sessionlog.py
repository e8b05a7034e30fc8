"""One session's append-only log: its catalog entry, and how a log is read back.

A log is a sequence of `records` frames: CREATED (or SNAPSHOT after a
compaction), then MESSAGES, PATCHED and CLEARED records, each one version
after the previous. The catalog `Entry` is what the store keeps in memory for
every session, cached or not; `scan_log` rebuilds it from the log alone.
"""

from __future__ import annotations

import asyncio
import hashlib
from array import array
from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json, to_json

from chatsessions.models import Session
from chatsessions.storage import records
from chatsessions.storage.common import from_us
from chatsessions.storage.records import Kind

HEAD_FIELDS = ("id", "user_id", "document_id", "section_id", "title", "settings", "metadata", "created_at")


def session_file_name(tenant: str, session_id: str) -> str:
    """32 lowercase hex digits: safe on every file system, whatever the id."""
    return hashlib.sha256(f"{tenant}\0{session_id}".encode()).hexdigest()[:32]


@dataclass(slots=True)
class Entry:
    """Catalog entry: what every session costs in memory, whether cached or not."""

    fname: str
    tenant: str
    id: str
    head: bytes  # JSON of HEAD_FIELDS
    user_id: str | None
    document_id: str | None
    section_id: str | None
    version: int
    last_seq: int
    first_live: int  # first seq not cleared
    updated_us: int
    size: int  # bytes of the session log
    generation: int = 0  # bumped when the log is rewritten (compaction)
    corrupted: bool = False
    # Appends are pipelined: each reserves its seq, version and log offset under the
    # session lock and waits for durability outside it, so appends to one session share
    # a group commit. The fields above are what is durable (and visible); these are
    # what the queued appends have reserved. `epoch` fences off appends built on a
    # reservation whose write failed.
    r_version: int = 0
    r_last_seq: int = 0
    r_size: int = 0
    epoch: int = 0
    pending: asyncio.Future[None] | None = None  # the last queued append

    def __post_init__(self) -> None:
        self.r_version, self.r_last_seq, self.r_size = self.version, self.last_seq, self.size

    def settle(self) -> None:
        """Nothing is pending (or it failed): reservations restart from what is durable."""
        self.r_version, self.r_last_seq, self.r_size = self.version, self.last_seq, self.size

    def set_head(self, head: bytes) -> None:
        fields = from_json(head)
        self.head = head
        self.user_id = fields.get("user_id")
        self.document_id = fields.get("document_id")
        self.section_id = fields.get("section_id")

    def session(
        self, *, version: int | None = None, last_seq: int | None = None, updated_us: int | None = None
    ) -> Session:
        """The session as it is durable, or with the counters a queued change will give it."""
        version = self.version if version is None else version
        last_seq = self.last_seq if last_seq is None else last_seq
        updated_us = self.updated_us if updated_us is None else updated_us
        counters = (
            f'{{"message_count":{last_seq - self.first_live + 1},"last_seq":{last_seq},'
            f'"version":{version},"updated_at":"{from_us(updated_us).isoformat()}",'
        ).encode()
        return Session.model_validate_json(counters + self.head[1:])

    def to_row(self) -> list[Any]:
        return [
            self.fname,
            self.tenant,
            self.id,
            self.head.decode(),
            self.version,
            self.last_seq,
            self.first_live,
            self.updated_us,
            self.size,
            self.user_id,
            self.document_id,
            self.section_id,
        ]

    @classmethod
    def from_row(cls, row: list[Any]) -> Entry:
        if len(row) == 12:  # the link fields are stored too: no JSON to parse per session at start-up
            # Positional, in field order: this runs once per session at start-up.
            return cls(row[0], row[1], row[2], row[3].encode(), row[9], row[10], row[11], *row[4:9])
        fname, tenant, session_id, head, version, last_seq, first_live, updated_us, size = row
        return cls.from_head(
            fname=fname,
            tenant=tenant,
            head=head.encode(),
            version=version,
            last_seq=last_seq,
            first_live=first_live,
            updated_us=updated_us,
            size=size,
            session_id=session_id,
        )

    @classmethod
    def from_head(
        cls,
        *,
        fname: str,
        tenant: str,
        head: bytes,
        version: int,
        last_seq: int,
        first_live: int,
        updated_us: int,
        size: int,
        session_id: str | None = None,
    ) -> Entry:
        fields = from_json(head)
        return cls(
            fname=fname,
            tenant=tenant,
            id=session_id or fields["id"],
            head=head,
            user_id=fields.get("user_id"),
            document_id=fields.get("document_id"),
            section_id=fields.get("section_id"),
            version=version,
            last_seq=last_seq,
            first_live=first_live,
            updated_us=updated_us,
            size=size,
        )


def head_of(session: Session) -> bytes:
    return to_json(session.model_dump(mode="json", include=set(HEAD_FIELDS)))


@dataclass(slots=True)
class LogState:
    """What a full scan of one session log yields."""

    tenant: str
    head: bytes
    version: int
    last_seq: int
    first_live: int
    updated_us: int
    offsets: array[int]  # record offset of each live seq
    valid_end: int
    total: int

    def entry(self, fname: str) -> Entry:
        return Entry.from_head(
            fname=fname,
            tenant=self.tenant,
            head=self.head,
            version=self.version,
            last_seq=self.last_seq,
            first_live=self.first_live,
            updated_us=self.updated_us,
            size=self.valid_end,
        )


def scan_log(data: bytes) -> LogState | None:
    """Rebuild a session from its log; None for an empty log. Raises records.Corrupted."""
    recs, valid_end = records.decode(data)
    state: LogState | None = None
    for rec in recs:
        if rec.kind in (Kind.CREATED, Kind.SNAPSHOT):
            body = from_json(bytes(rec.body))
            state = LogState(
                tenant=body["tenant"],
                head=to_json(body["head"]),
                version=rec.version,
                last_seq=rec.seq,
                first_live=rec.seq + 1,
                updated_us=rec.updated_us,
                offsets=array("q"),
                valid_end=0,
                total=len(data),
            )
            continue
        if state is None or rec.version != state.version + 1:
            raise records.Corrupted(rec.offset)
        if rec.kind is Kind.MESSAGES:
            if rec.seq != state.last_seq + 1:
                raise records.Corrupted(rec.offset)
            state.offsets.extend([rec.offset] * rec.count)
            state.last_seq += rec.count
        elif rec.kind is Kind.PATCHED:
            state.head = bytes(rec.body)
        elif rec.kind is Kind.CLEARED:
            state.first_live = state.last_seq + 1
            state.offsets = array("q")
        else:
            raise records.Corrupted(rec.offset)
        state.version = rec.version
        state.updated_us = rec.updated_us
    if state is not None:
        state.valid_end = valid_end
        state.total = len(data)
    return state
