"""The SQL of the embedded store, and the one place where rows become domain models."""

from __future__ import annotations

from typing import Any

from pydantic_core import from_json, to_json

from chatsessions.models import Message, Session
from chatsessions.storage.common import from_us, to_us
from chatsessions.storage.sqlite.writer import Head
from chatsessions.text import content_text

SESSION_COLUMNS = (
    "pk, id, user_id, document_id, section_id, title, settings, metadata, "
    "message_count, last_seq, version, created_at, updated_at, expires_at, pinned"
)
# A live session: not past its expires_at (arguments: now), and not idle unless pinned
# (arguments: the idle cutoff; `NO_CUTOFF` without an idle rule). Expiry is decided here, by
# time, in every read: the sweeper only reclaims the space later.
ALIVE = "({p}expires_at IS NULL OR {p}expires_at > ?) AND ({p}pinned OR {p}updated_at > ?)"
NO_CUTOFF = -(2**63)
_ALIVE = ALIVE.format(p="")
SELECT_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = ? AND id = ?"
SELECT_LIVE_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = ? AND id = ? AND {_ALIVE}"
SELECT_SESSION_PK = f"SELECT pk FROM sessions WHERE tenant = ? AND id = ? AND {_ALIVE}"
INSERT_SESSION = """
INSERT INTO sessions (tenant, id, user_id, document_id, section_id, title, settings, metadata,
                      message_count, last_seq, version, created_at, updated_at, expires_at, pinned)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, id) DO NOTHING
RETURNING pk
"""
UPDATE_SESSION = """
UPDATE sessions
SET user_id = ?, document_id = ?, section_id = ?, title = ?, settings = ?, metadata = ?,
    message_count = ?, last_seq = ?, version = ?, updated_at = ?, expires_at = ?, pinned = ?
WHERE pk = ?
"""
UPDATE_COUNTERS = "UPDATE sessions SET message_count = ?, last_seq = ?, version = ?, updated_at = ? WHERE pk = ?"
DELETE_SESSION = "DELETE FROM sessions WHERE pk = ?"

INSERT_MESSAGE = """
INSERT INTO messages (session_pk, seq, size, created_at, body, client_id) VALUES (?, ?, ?, ?, ?, ?) RETURNING rowid
"""
SELECT_CLIENT_ID = "SELECT seq FROM messages WHERE session_pk = ? AND client_id = ?"
DELETE_MESSAGES = "DELETE FROM messages WHERE session_pk = ?"
INDEX_WORDS = "INSERT INTO message_words (rowid, words) VALUES (?, ?)"
UNINDEX_SESSION = "DELETE FROM message_words WHERE rowid IN (SELECT rowid FROM messages WHERE session_pk = ?)"
INSERT_CITATION = """
INSERT INTO citations (tenant, doc_id, created_at, session_id, seq, ordinal, session_pk, reference)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
DELETE_CITATIONS = "DELETE FROM citations WHERE session_pk = ?"
DELETE_ANSWERS = "DELETE FROM idempotency_keys WHERE session_pk = ?"
# One message: its row (giving its rowid for the words), then its citations.
DELETE_MESSAGE = "DELETE FROM messages WHERE session_pk = ? AND seq = ? RETURNING rowid"
# Incremental merge of full-text segments (negative: merge whatever levels there are, page by page).
MERGE_WORDS = "INSERT INTO message_words (message_words, rank) VALUES ('merge', ?)"
UNINDEX_MESSAGE = "DELETE FROM message_words WHERE rowid = ?"
DELETE_MESSAGE_CITATIONS = "DELETE FROM citations WHERE session_pk = ? AND seq = ?"
# The purge of an expired session, a bounded chunk at a time: the seq where the chunk ends
# (None: the rest), then the words, citations and rows of the messages up to it.
CHUNK_END = "SELECT seq FROM messages WHERE session_pk = ? ORDER BY seq LIMIT 1 OFFSET ?"
UNINDEX_CHUNK = "DELETE FROM message_words WHERE rowid IN (SELECT rowid FROM messages WHERE session_pk = ? AND seq < ?)"
DELETE_CITATIONS_CHUNK = "DELETE FROM citations WHERE session_pk = ? AND seq < ?"
DELETE_MESSAGES_CHUNK = "DELETE FROM messages WHERE session_pk = ? AND seq < ?"
# Expired sessions (any tenant), through the two partial indexes.
EXPIRED_BY_TIME = "SELECT pk, tenant, id FROM sessions WHERE expires_at <= ? ORDER BY expires_at LIMIT ?"
EXPIRED_BY_IDLE = "SELECT pk, tenant, id FROM sessions WHERE pinned = 0 AND updated_at <= ? ORDER BY updated_at LIMIT ?"
# Erasure of a user's sessions (`{filters}`: ` AND document_id = ?` or nothing), a batch at a time.
USER_SESSIONS = "SELECT pk, id FROM sessions WHERE tenant = ? AND user_id = ?{filters} LIMIT ?"
# Export: the tenant's live sessions in id order, after a position; `{filters}` holds ` AND <column> = ?`.
EXPORT_SESSIONS = (
    f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = ? AND id > ?{{filters}} AND {_ALIVE} ORDER BY id LIMIT ?"
)
# Search: FTS5 finds the tenant's matching messages (best first, bm25); the join adds the
# session and its filters. Arguments: the match expression, limit, offset, then what `{filters}`
# (` AND s.<column> = ?n` terms) names.
# Only (rowid, rank) of the matches are sorted; bodies are read for the page alone.
SEARCH = """
SELECT s.id, m.seq, m.body
FROM (
    SELECT w.rowid AS hit, w.rank AS score FROM message_words w{join}
    WHERE message_words MATCH ?1{filters}
    ORDER BY w.rank, w.rowid
    LIMIT ?2 OFFSET ?3
) h
JOIN messages m ON m.rowid = h.hit
JOIN sessions s ON s.pk = m.session_pk
ORDER BY h.score, h.hit
"""
SEARCH_JOIN = " JOIN messages m ON m.rowid = w.rowid JOIN sessions s ON s.pk = m.session_pk"

PAGE_ASC = "SELECT size, body FROM messages WHERE session_pk = ? AND seq > ? AND seq < ? ORDER BY seq ASC LIMIT ?"
PAGE_DESC = "SELECT size, body FROM messages WHERE session_pk = ? AND seq > ? AND seq < ? ORDER BY seq DESC LIMIT ?"
ANY_AFTER = "SELECT 1 FROM messages WHERE session_pk = ? AND seq > ? AND seq < ? LIMIT 1"
SELECT_MESSAGE = "SELECT body FROM messages WHERE session_pk = ? AND seq = ?"

SELECT_ANSWER = """
SELECT fingerprint, status, body, headers FROM idempotency_keys WHERE tenant = ? AND key = ? AND expires_at > ?
"""
STORE_ANSWER = """
INSERT OR REPLACE INTO idempotency_keys (tenant, key, fingerprint, status, body, headers, session_pk, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
PURGE_ANSWERS = """
DELETE FROM idempotency_keys WHERE rowid IN (SELECT rowid FROM idempotency_keys WHERE expires_at <= ? LIMIT ?)
"""


def head_from(row: tuple[Any, ...]) -> Head:
    """A `SESSION_COLUMNS` row as the writer's head."""
    (
        pk,
        sid,
        user_id,
        document_id,
        section_id,
        title,
        settings,
        metadata,
        count,
        last_seq,
        version,
        created,
        updated,
        expires,
        pinned,
    ) = row
    session = Session.model_validate(
        {
            "id": sid,
            "user_id": user_id,
            "document_id": document_id,
            "section_id": section_id,
            "title": title,
            "settings": from_json(settings),
            "metadata": from_json(metadata),
            "message_count": count,
            "last_seq": last_seq,
            "version": version,
            "created_at": from_us(created),
            "updated_at": from_us(updated),
            "expires_at": None if expires is None else from_us(expires),
            "pinned": bool(pinned),
        }
    )
    return Head(pk, session, head_size(title, settings, metadata))


# What a cached head costs beyond its JSON fields: the Session object, its strings, the LRU entry.
HEAD_OVERHEAD_BYTES = 1024


def head_size(title: str | None, settings: str, metadata: str) -> int:
    """Estimated memory of a cached head, from its variable fields as stored."""
    return HEAD_OVERHEAD_BYTES + len(title or "") + len(settings) + len(metadata)


def session_values(tenant: str, session: Session) -> tuple[Any, ...]:
    """The columns of `INSERT_SESSION`, in order."""
    return (
        tenant,
        session.id,
        session.user_id,
        session.document_id,
        session.section_id,
        session.title,
        session.settings.model_dump_json(),
        _json(session.metadata),
        session.message_count,
        session.last_seq,
        session.version,
        to_us(session.created_at),
        to_us(session.updated_at),
        None if session.expires_at is None else to_us(session.expires_at),
        int(session.pinned),
    )


def update_values(pk: int, session: Session) -> tuple[Any, ...]:
    """The columns of `UPDATE_SESSION`, in order."""
    return (
        session.user_id,
        session.document_id,
        session.section_id,
        session.title,
        session.settings.model_dump_json(),
        _json(session.metadata),
        session.message_count,
        session.last_seq,
        session.version,
        to_us(session.updated_at),
        None if session.expires_at is None else to_us(session.expires_at),
        int(session.pinned),
        pk,
    )


def counter_values(pk: int, session: Session) -> tuple[int, ...]:
    """The columns of `UPDATE_COUNTERS`, in order."""
    return (session.message_count, session.last_seq, session.version, to_us(session.updated_at), pk)


def message_values(pk: int, message: Message) -> tuple[Any, ...]:
    """The columns of `INSERT_MESSAGE`, in order."""
    size = len(content_text(message.content).encode("utf-8", "surrogatepass"))
    return (pk, message.seq, size, to_us(message.created_at), message.model_dump_json(), message.id)


def message_from(body: str) -> Message:
    return Message.model_validate_json(body)


def _json(value: object) -> str:
    return to_json(value).decode()
