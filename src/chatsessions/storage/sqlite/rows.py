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
    "message_count, last_seq, version, created_at, updated_at"
)
SELECT_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = ? AND id = ?"
SELECT_SESSION_PK = "SELECT pk FROM sessions WHERE tenant = ? AND id = ?"
INSERT_SESSION = """
INSERT INTO sessions (tenant, id, user_id, document_id, section_id, title, settings, metadata,
                      message_count, last_seq, version, created_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (tenant, id) DO NOTHING
RETURNING pk
"""
UPDATE_SESSION = """
UPDATE sessions
SET user_id = ?, document_id = ?, section_id = ?, title = ?, settings = ?, metadata = ?,
    message_count = ?, last_seq = ?, version = ?, updated_at = ?
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
# Search: FTS5 finds the tenant's matching messages (best first, bm25); the join adds the
# session and its filters. `{filters}` holds ` AND s.<column> = ?` terms.
# Only (rowid, rank) of the matches are sorted; bodies are read for the page alone.
SEARCH = """
SELECT s.id, m.seq, m.body
FROM (
    SELECT w.rowid AS hit, w.rank AS score FROM message_words w{join}
    WHERE message_words MATCH ?{filters}
    ORDER BY w.rank, w.rowid
    LIMIT ? OFFSET ?
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
    pk, sid, user_id, document_id, section_id, title, settings, metadata, count, last_seq, version, created, updated = (
        row
    )
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
