"""The database file: where it lives, how a connection is opened, and the schema's versions.

Layout of the data directory::

    LOCK                  exclusive lock (flock): one process owns the directory
    chatsessions.db       the SQLite database (WAL journal mode)
    chatsessions.db-wal   SQLite's write-ahead log; checkpointed into the database
    chatsessions.db-shm   SQLite's shared-memory index of the WAL

The schema is versioned by `PRAGMA user_version`: `MIGRATIONS[i]` takes the
database from version i to i + 1, each step in its own transaction, so a
crash during an upgrade leaves the database at a version it knows.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import apsw

from chatsessions.config import FsyncMode, Settings, StoreKind
from chatsessions.errors import StorageCorrupted, StorageIncompatible, StorageLocked, StorageUnavailable

DB_NAME = "chatsessions.db"
LOCK_NAME = "LOCK"
# What the 0.1 file store left in its data directory.
_OLD_FORMAT = ("catalog.json", "wal", "s")

# Append-only: a released step is never edited; a change of schema is a new step.
MIGRATIONS: tuple[str, ...] = (
    # 1: sessions, messages, idempotency keys.
    """
    CREATE TABLE sessions (
        pk            INTEGER PRIMARY KEY,
        tenant        TEXT NOT NULL,
        id            TEXT NOT NULL,
        user_id       TEXT,
        document_id   TEXT,
        section_id    TEXT,
        title         TEXT,
        settings      TEXT NOT NULL,     -- JSON object
        metadata      TEXT NOT NULL,     -- JSON object
        message_count INTEGER NOT NULL,
        last_seq      INTEGER NOT NULL,
        version       INTEGER NOT NULL,
        created_at    INTEGER NOT NULL,  -- microseconds since 1970-01-01 UTC
        updated_at    INTEGER NOT NULL,
        UNIQUE (tenant, id)
    );
    -- Listings: newest updated_at first, ties by id, optionally filtered by one link.
    CREATE INDEX sessions_recent ON sessions (tenant, updated_at DESC, id);
    CREATE INDEX sessions_by_user ON sessions (tenant, user_id, updated_at DESC, id) WHERE user_id IS NOT NULL;
    CREATE INDEX sessions_by_document ON sessions (tenant, document_id, updated_at DESC, id)
        WHERE document_id IS NOT NULL;
    CREATE INDEX sessions_by_section ON sessions (tenant, section_id, updated_at DESC, id)
        WHERE section_id IS NOT NULL;

    -- One row a message; `body` is the message as the API renders it (JSON), the other
    -- columns are what queries need. The integer key leaves room for an FTS5 index
    -- with external content and for a citations table keyed by message.
    CREATE TABLE messages (
        rowid      INTEGER PRIMARY KEY,
        session_pk INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        size       INTEGER NOT NULL,     -- UTF-8 bytes of the content (page byte limit)
        created_at INTEGER NOT NULL,
        body       TEXT NOT NULL,
        UNIQUE (session_pk, seq)
    );

    -- Answers kept under an Idempotency-Key; `session_pk` names the session whose
    -- content an answer may hold, so that erasing the session can erase it too.
    CREATE TABLE idempotency_keys (
        tenant      TEXT NOT NULL,
        key         TEXT NOT NULL,
        fingerprint TEXT NOT NULL,
        status      INTEGER NOT NULL,
        body        BLOB NOT NULL,
        headers     TEXT NOT NULL,       -- JSON object
        session_pk  INTEGER,
        expires_at  INTEGER NOT NULL,    -- microseconds since 1970-01-01 UTC
        PRIMARY KEY (tenant, key)
    );
    CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
    CREATE INDEX idempotency_keys_session ON idempotency_keys (session_pk) WHERE session_pk IS NOT NULL;
    """,
    # 2: full-text search and citations, kept in the transaction of the messages they index.
    """
    -- Contentless FTS5 (the text lives once, in messages.body): the message's folded words,
    -- each prefixed by its tenant and role (chatsessions.text.scoped_words), so a word's list
    -- holds only that tenant's messages. Deletable by rowid (= messages.rowid).
    CREATE VIRTUAL TABLE message_words USING fts5(
        words, content = '', contentless_delete = 1, tokenize = 'unicode61 remove_diacritics 0'
    );

    -- One row per reference of a message whose `doc_id` member is a string.
    CREATE TABLE citations (
        tenant     TEXT NOT NULL,
        doc_id     TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        session_id TEXT NOT NULL,
        seq        INTEGER NOT NULL,
        ordinal    INTEGER NOT NULL,    -- the reference's index in the message's references
        session_pk INTEGER NOT NULL,
        reference  TEXT NOT NULL        -- JSON object
    );
    CREATE INDEX citations_by_doc ON citations (tenant, doc_id, created_at DESC, session_id, seq, ordinal);
    CREATE INDEX citations_by_session ON citations (session_pk, seq);
    """,
    # 3: client message ids, unique in their session (every other message field lives in `body`).
    """
    ALTER TABLE messages ADD COLUMN client_id TEXT;
    CREATE UNIQUE INDEX messages_by_client_id ON messages (session_pk, client_id) WHERE client_id IS NOT NULL;
    """,
    # 4 (issue 13): retention (expires_at, pinned) and erasure.
    """
    ALTER TABLE sessions ADD COLUMN expires_at INTEGER;  -- microseconds since 1970-01-01 UTC; NULL: never
    ALTER TABLE sessions ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;
    -- The sweeper finds expired sessions through these, without a scan.
    CREATE INDEX sessions_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;
    CREATE INDEX sessions_idle ON sessions (updated_at) WHERE pinned = 0;
    -- A deleted message's words leave the full-text index at once (no tombstone keeps them).
    INSERT INTO message_words (message_words, rank) VALUES ('secure-delete', 1);
    """,
    # 5 (issue 12): change events, written in the transaction of the change they describe,
    # and the streamed messages' idle clock.
    # AUTOINCREMENT: an id is never reused, and sqlite_sequence keeps the highest one ever
    # given (the tenant feed's current position even when every event was pruned).
    """
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant      TEXT NOT NULL,
        session_id  TEXT NOT NULL,
        version     INTEGER NOT NULL,   -- the session's version after the change
        type        TEXT NOT NULL,
        data        TEXT NOT NULL,      -- one line of JSON, as the feeds send it
        user_id     TEXT,               -- the session's links after the change (tenant-feed filters)
        document_id TEXT,
        section_id  TEXT,
        created_at  INTEGER NOT NULL    -- microseconds since 1970-01-01 UTC (retention)
    );
    CREATE INDEX events_by_session ON events (tenant, session_id, version);
    CREATE INDEX events_by_tenant ON events (tenant, id);
    CREATE INDEX events_by_age ON events (created_at);

    -- The streamed (in_progress) messages and when each last changed: the idle timeout's work list.
    CREATE TABLE streams (
        session_pk INTEGER NOT NULL,
        seq        INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,     -- microseconds since 1970-01-01 UTC
        PRIMARY KEY (session_pk, seq)
    ) WITHOUT ROWID;
    CREATE INDEX streams_idle ON streams (updated_at);
    """,
)


@dataclass(frozen=True, slots=True)
class Location:
    """How to reach one database: its name for `apsw.Connection`, and the VFS to use."""

    name: str
    vfs: str | None
    in_memory: bool
    synchronous: str  # PRAGMA synchronous
    wal_autocheckpoint: int  # pages

    @classmethod
    def for_settings(cls, settings: Settings, *, vfs: str | None = None) -> Location:
        pages = max(1, settings.wal_segment_bytes // 4096)
        synchronous = "FULL" if settings.fsync is FsyncMode.always else "OFF"
        if settings.store is StoreKind.memory:
            # SQLite's memdb VFS: one database shared by every connection of this process
            # that names it; it is gone when the last connection closes.
            return cls(f"file:/chatsessions-{uuid.uuid4().hex}?vfs=memdb", None, True, "OFF", pages)
        return cls(str(settings.data_dir / DB_NAME), vfs, False, synchronous, pages)

    def connect(self, *, readonly: bool) -> apsw.Connection:
        flags = apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_NOMUTEX
        flags |= apsw.SQLITE_OPEN_READONLY if readonly else apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE
        try:
            if self.vfs is None:
                conn = apsw.Connection(self.name, flags=flags)
            else:
                conn = apsw.Connection(self.name, flags=flags, vfs=self.vfs)
        except apsw.CantOpenError as exc:
            raise StorageUnavailable(f"cannot open {self.name}: {exc}") from exc
        conn.set_busy_timeout(10_000)
        if readonly:
            conn.pragma("query_only", True)
        return conn


def configure_writer(conn: apsw.Connection, location: Location) -> None:
    """Pragmas of the write connection; raises StorageCorrupted for a file that is no database."""
    try:
        if not location.in_memory:
            mode = conn.pragma("journal_mode", "wal")
            if str(mode).lower() != "wal":
                raise StorageUnavailable(f"{location.name}: SQLite refused WAL journal mode ({mode})")
        conn.pragma("synchronous", location.synchronous)
        conn.pragma("secure_delete", True)
        conn.pragma("wal_autocheckpoint", location.wal_autocheckpoint)
        conn.pragma("journal_size_limit", 64 * 2**20)
        conn.pragma("cache_size", -32_768)  # KiB: 32 MiB of page cache for the writer
    except (apsw.CorruptError, apsw.NotADBError) as exc:
        raise StorageCorrupted(f"{location.name} is not a chatsessions database or is corrupt ({exc})") from exc


def migrate(conn: apsw.Connection, location: Location) -> list[int]:
    """Apply every step of `MIGRATIONS` the database lacks; return the versions applied."""
    try:
        current = int(conn.pragma("user_version"))
        if current > len(MIGRATIONS):
            raise StorageIncompatible(
                f"{location.name} is at schema version {current}, newer than this release knows ({len(MIGRATIONS)})"
            )
        applied: list[int] = []
        for version in range(current + 1, len(MIGRATIONS) + 1):
            with conn:  # one transaction a step
                conn.execute(MIGRATIONS[version - 1])
                conn.pragma("user_version", version)
            applied.append(version)
        return applied
    except (apsw.CorruptError, apsw.NotADBError) as exc:
        raise StorageCorrupted(f"{location.name} is not a chatsessions database or is corrupt ({exc})") from exc


class DataDirLock:
    """The exclusive lock on a data directory, held from `acquire` until `release`."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Create the directory if needed, refuse an old-format one, and lock it.

        Raises:
            StorageLocked: another process (or another open store) owns the directory.
            StorageIncompatible: the directory holds the 0.1 file store.
        """
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create the data directory {data_dir}: {exc.strerror}") from exc
        old = [name for name in _OLD_FORMAT if (data_dir / name).exists()]
        if old:
            raise StorageIncompatible(
                f"{data_dir} holds a chatsessions 0.1 file store ({', '.join(old)}), which this release cannot "
                "read: move it away or point CHATSESSIONS_DATA_DIR elsewhere"
            )
        fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StorageLocked(f"the data directory {data_dir} is locked by another chatsessions process") from exc
        return cls(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def probe_data_dir_lock(data_dir: Path) -> None:
    """Raise StorageLocked (or StorageIncompatible) now if the store could not be opened there."""
    if data_dir.is_dir():
        DataDirLock.acquire(data_dir).release()
