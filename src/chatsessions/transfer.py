"""Export and import of a tenant's sessions as NDJSON, over any `SessionRepository`.

The format (version 1), one JSON object a line::

    {"format": "chatsessions.export", "version": 1, "exported_at": "2026-12-02T01:00:00Z"}
    {"type": "session", "session": {...every field of the session...}}
    {"type": "message", "session_id": "s1", "message": {...every field of the message...}}
    ...

Each session line is followed by its messages in seq order. Both directions
stream: the export reads one page of sessions and one page of messages at a
time; the import holds one session (with its messages) at a time and stores
it in one change, when the next session line or the end of the stream shows
that it is complete. The HTTP routes (`api/transfer.py`) and the CLI
(`chatsessions export | import`) both use this module.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from chatsessions.errors import SessionNotFound
from chatsessions.models import (
    SESSION_ID_RE,
    ExportFilter,
    ImportOutcome,
    ImportSummary,
    Message,
    MessageQuery,
    Session,
    utcnow,
)
from chatsessions.storage.base import SessionRepository

FORMAT = "chatsessions.export"
VERSION = 1
EXPORT_SESSIONS_PAGE = 100
EXPORT_MESSAGES_PAGE = 1000
CHUNK_BYTES = 64 * 1024  # lines are sent in chunks of about this size


def header_line() -> bytes:
    moment = utcnow().isoformat().replace("+00:00", "Z")
    return to_json({"format": FORMAT, "version": VERSION, "exported_at": moment}) + b"\n"


def session_line(session: Session) -> bytes:
    return b'{"type":"session","session":' + session.model_dump_json().encode() + b"}\n"


def message_line(session_id: str, message: Message) -> bytes:
    return (
        b'{"type":"message","session_id":'
        + to_json(session_id)
        + b',"message":'
        + message.model_dump_json().encode()
        + b"}\n"
    )


async def export_lines(repository: SessionRepository, tenant: str, filters: ExportFilter) -> AsyncIterator[bytes]:
    """The export's lines, one at a time: memory stays at one page of sessions and one of messages."""
    yield header_line()
    after: str | None = None
    while True:
        sessions = await repository.export_sessions(tenant, filters=filters, after=after, limit=EXPORT_SESSIONS_PAGE)
        for session in sessions:
            yield session_line(session)
            seq: int | None = None
            while True:
                try:
                    items, more = await repository.list_messages(
                        tenant, session.id, MessageQuery(after=seq, limit=EXPORT_MESSAGES_PAGE)
                    )
                except SessionNotFound:  # deleted while we exported it
                    break
                for message in items:
                    yield message_line(session.id, message)
                if not more or not items:
                    break
                seq = items[-1].seq
        if len(sessions) < EXPORT_SESSIONS_PAGE:
            return
        after = sessions[-1].id


async def export_chunks(repository: SessionRepository, tenant: str, filters: ExportFilter) -> AsyncIterator[bytes]:
    """`export_lines` gathered into chunks of about `CHUNK_BYTES`, for a socket or a file."""
    chunk: list[bytes] = []
    size = 0
    async for line in export_lines(repository, tenant, filters):
        chunk.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            yield b"".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield b"".join(chunk)


# --- import ---------------------------------------------------------------------------------


class ImportLineError(Exception):
    """A line of an import that cannot be imported; `summary` says what was imported before it."""

    def __init__(self, line: int, reason: str, summary: ImportSummary) -> None:
        super().__init__(f"line {line}: {reason}")
        self.line = line
        self.reason = reason
        self.summary = summary


async def numbered_lines(chunks: AsyncIterable[bytes], *, max_line_bytes: int) -> AsyncIterator[tuple[int, bytes]]:
    """The non-blank lines of a byte stream with their 1-based numbers; a line over the limit is an error."""
    number = 0
    pending = b""
    async for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            number += 1
            if len(line) > max_line_bytes:
                raise _TooLong(number, max_line_bytes)
            if line.strip():
                yield number, line
        if len(pending) > max_line_bytes:
            raise _TooLong(number + 1, max_line_bytes)
    if pending.strip():
        yield number + 1, pending


class _TooLong(Exception):
    def __init__(self, line: int, limit: int) -> None:
        super().__init__(f"the line is longer than {limit} bytes")
        self.line = line


@dataclass(slots=True)
class _Pending:
    """The session being read, with its messages so far."""

    session: Session
    messages: list[Message] = field(default_factory=list)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        value = from_json(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _session_from(value: dict[str, Any]) -> Session:
    session = Session.model_validate(value.get("session"))
    if not SESSION_ID_RE.match(session.id):
        raise ValueError(f"session id {session.id!r} is not a valid id")
    if session.version < 1 or session.last_seq < 0:
        raise ValueError("session version must be at least 1 and last_seq at least 0")
    return session


async def import_lines(
    repository: SessionRepository,
    tenant: str,
    chunks: AsyncIterable[bytes],
    *,
    replace: bool,
    max_line_bytes: int,
) -> ImportSummary:
    """Import an export's lines: each session in one change, once the line after it shows it is complete.

    Raises:
        ImportLineError: a line is not JSON, has an unknown `type`, breaks a limit, or puts
            messages out of seq order. The sessions completed before it stay imported; the one
            it interrupts and everything after it are not.
    """
    writes = _Writes(repository, tenant, replace=replace)
    pending: _Pending | None = None
    number = 0
    header_seen = False
    try:
        async for numbered in numbered_lines(chunks, max_line_bytes=max_line_bytes):
            number, raw = numbered  # kept past the loop: an error names its line
            value = _parse(raw)
            if not header_seen:
                if value.get("format") != FORMAT or value.get("version") != VERSION:
                    raise ValueError(f"the first line must be the header of a {FORMAT} version {VERSION}")
                header_seen = True
                continue
            kind = value.get("type")
            if kind == "session":
                session = _session_from(value)
                if pending is not None:
                    await writes.submit(pending)
                pending = _Pending(session)
            elif kind == "message":
                if pending is None:
                    raise ValueError("a message line before any session line")
                if value.get("session_id") != pending.session.id:
                    raise ValueError(f"a message of {value.get('session_id')!r} inside session {pending.session.id!r}")
                message = Message.model_validate(value.get("message"))
                previous = pending.messages[-1].seq if pending.messages else 0
                if message.seq <= previous:
                    raise ValueError(f"message seq {message.seq} is not after {previous}: not in seq order")
                pending.messages.append(message)
            else:
                raise ValueError(f"unknown type {kind!r} (session or message)")
        if number == 0:
            raise ValueError("the import is empty: the first line must be the header")
    except _TooLong as exc:
        raise ImportLineError(exc.line, str(exc), await writes.finish()) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ImportLineError(number, f"{where}: {first['msg']}", await writes.finish()) from exc
    except ValueError as exc:
        raise ImportLineError(max(number, 1), str(exc), await writes.finish()) from exc
    except BaseException:
        await writes.cancel()
        raise
    if pending is not None:
        await writes.submit(pending)
    return await writes.finish()


# Completed sessions whose change is queued while the next ones are read: the store commits
# them together (group commit) instead of one round trip each. Memory: this many sessions.
IMPORT_IN_FLIGHT = 8


class _Writes:
    """The import's changes in flight, in file order; the summary counts those that committed."""

    def __init__(self, repository: SessionRepository, tenant: str, *, replace: bool) -> None:
        self._repository = repository
        self._tenant = tenant
        self._replace = replace
        self._flight: deque[tuple[Session, int, asyncio.Task[ImportOutcome]]] = deque()
        self.summary = ImportSummary()

    async def submit(self, pending: _Pending) -> None:
        session, messages = pending.session, pending.messages
        # Counters follow the messages the import holds: for an export of a quiet store they are the
        # exported ones; an export taken while the session changed cannot make the store inconsistent.
        last_seq = max(session.last_seq, messages[-1].seq if messages else 0)
        if (session.message_count, session.last_seq) != (len(messages), last_seq):
            session = session.model_copy(update={"message_count": len(messages), "last_seq": last_seq})
        write = self._repository.import_session(self._tenant, session, messages, replace=self._replace)
        self._flight.append((session, len(messages), asyncio.ensure_future(write)))
        while len(self._flight) >= IMPORT_IN_FLIGHT:
            await self._settle_first()

    async def _settle_first(self) -> None:
        session, count, task = self._flight.popleft()
        outcome = await task
        if outcome is ImportOutcome.skipped:
            self.summary.skipped.append(session.id)
            return
        if outcome is ImportOutcome.replaced:
            self.summary.replaced.append(session.id)
        self.summary.sessions += 1
        self.summary.messages += count

    async def finish(self) -> ImportSummary:
        """Wait for every change in flight (a failed one raises after the others settled)."""
        failure: BaseException | None = None
        while self._flight:
            try:
                await self._settle_first()
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return self.summary

    async def cancel(self) -> None:
        for _, _, task in self._flight:
            task.cancel()
        await asyncio.gather(*(task for _, _, task in self._flight), return_exceptions=True)
        self._flight.clear()
