"""The one place where domain models become query arguments and rows become domain models."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pydantic import BaseModel

from chatsessions.models import Message, MessageCreate, Role, Session
from chatsessions.storage.common import cited_doc_ids
from chatsessions.text import content_text, scoped_words, tsvector_literal

# What PostgreSQL text cannot hold: NUL, and (not being UTF-8) unpaired surrogates.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


def dump(value: Any) -> str | None:
    """A JSON value as the text of a jsonb argument (None stays SQL NULL)."""
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def moment(at: datetime) -> datetime:
    """A timestamp for a timestamptz argument (a naive one is taken as UTC)."""
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def session_from(row: asyncpg.Record) -> Session:
    """A session from a row holding `queries.SESSION_COLUMNS`."""
    return Session.model_validate(
        {
            "id": row["id"],
            "user_id": row["user_id"],
            "document_id": row["document_id"],
            "section_id": row["section_id"],
            "title": row["title"],
            "settings": json.loads(row["settings"]),
            "metadata": json.loads(row["metadata"]),
            "message_count": row["message_count"],
            "last_seq": row["last_seq"],
            "version": row["version"],
            "created_at": row["created_at"],
            "updated_at": row["updated_at"],
            "expires_at": row["expires_at"],
            "pinned": row["pinned"],
        }
    )


def message_from(row: asyncpg.Record) -> Message:
    """A message from a row holding `queries.MESSAGE_COLUMNS`."""
    return Message.model_validate(
        {
            "seq": row["seq"],
            "id": row["client_id"],
            "role": Role(row["role"]),
            "content": content_of(row),
            "name": row["name"],
            "tool_calls": load(row["tool_calls"]),
            "tool_call_id": row["tool_call_id"],
            "status": row["status"],
            "metadata": load(row["metadata"]),
            "references": load(row["refs"]),
            "created_at": row["created_at"],
            "updated_at": row["updated_at"] or row["created_at"],
        }
    )


def session_values(session: Session) -> tuple[Any, ...]:
    """The columns of `sessions` after (tenant, id), in the order of `queries.GET_OR_INSERT_SESSION`'s arguments."""
    return (
        session.user_id,
        session.document_id,
        session.section_id,
        session.title,
        dump(session.settings.model_dump(mode="json")),
        dump(session.metadata),
        session.message_count,
        session.last_seq,
        session.version,
        session.created_at,
        session.updated_at,
        session.expires_at,
        session.pinned,
    )


def session_links(session: Session) -> tuple[Any, ...]:
    """The columns a patch may change, in `queries.UPDATE_SESSION` order (after tenant, id)."""
    return (
        session.user_id,
        session.document_id,
        session.section_id,
        session.title,
        dump(session.settings.model_dump(mode="json")),
        dump(session.metadata),
        session.expires_at,
        session.pinned,
    )


def _raw_content(content: str) -> bytes | None:
    """Content that a text column cannot hold, as bytes; None when it can."""
    if _NOT_TEXT.search(content) is None:
        return None
    return content.encode("utf-8", "surrogatepass")


def storable(values: Iterable[Any]) -> bool:
    """Whether PostgreSQL takes every text among `values`, JSON texts included.

    It refuses U+0000 (and unpaired surrogates) in text and jsonb; only message
    content has a way around that (`content_raw`).
    """
    for value in values:
        if isinstance(value, str) and ("\\u0000" in value or _NOT_TEXT.search(value) is not None):
            return False
    return True


def message_arrays(tenant: str, messages: Sequence[MessageCreate | Message]) -> tuple[list[Any], ...]:
    """The message arrays of `queries.APPEND`, one per `queries.MESSAGE_FIELDS`."""
    raw = [_raw_content(m.content) if isinstance(m.content, str) else None for m in messages]
    return (
        [m.role.value for m in messages],
        [m.content if isinstance(m.content, str) and r is None else None for m, r in zip(messages, raw, strict=True)],
        raw,
        [dump(m.metadata) for m in messages],
        [dump(m.references) for m in messages],
        [_dump_models(m.content) if isinstance(m.content, list) else None for m in messages],
        [m.id for m in messages],
        [m.name for m in messages],
        [_dump_models(m.tool_calls) for m in messages],
        [m.tool_call_id for m in messages],
        [m.status.value for m in messages],
        [_words(tenant, m) for m in messages],
    )


def imported_arrays(tenant: str, messages: list[Message]) -> tuple[list[Any], ...]:
    """The arrays of `queries.IMPORT_MESSAGES` after (tenant, session id): seq, times, then `message_arrays`."""
    return (
        [m.seq for m in messages],
        [m.created_at for m in messages],
        [m.updated_at for m in messages],
        *message_arrays(tenant, messages),
    )


def imported_citations(messages: list[Message]) -> tuple[list[Any], ...]:
    """The arrays of `queries.IMPORT_CITATIONS` after (tenant, session id)."""
    found = [
        (m.seq, m.created_at, ordinal, doc_id, dump(ref))
        for m in messages
        for ordinal, doc_id, ref in cited_doc_ids(m.references)
    ]
    return tuple(list(column) for column in zip(*found, strict=True)) if found else ([], [], [], [], [])


def _dump_models(models: Sequence[BaseModel] | None) -> str | None:
    return None if models is None else dump([model.model_dump(mode="json") for model in models])


def _words(tenant: str, message: MessageCreate | Message) -> str | None:
    if message.status.value == "in_progress":
        return None  # a streamed message is indexed once it completes
    found = scoped_words(tenant, message.role.value, content_text(message.content))
    return tsvector_literal(found) if found else None


def citation_arrays(messages: list[Message]) -> tuple[list[Any], ...]:
    """The arrays of `queries.INSERT_CITATIONS` after (tenant, session id): seq, ordinal, doc_id, reference."""
    found = [
        (m.seq, ordinal, doc_id, dump(ref))
        for m in messages
        if m.status.value != "in_progress"  # a streamed message is cited once it completes
        for ordinal, doc_id, ref in cited_doc_ids(m.references)
    ]
    return tuple(list(column) for column in zip(*found, strict=True)) if found else ([], [], [], [])


def content_of(row: asyncpg.Record) -> Any:
    """A message row's content: text, the bytes text could not hold, a list of parts (JSON), or None."""
    content: str | None = row["content"]
    if content is not None:
        return content
    if row["content_raw"] is not None:
        return bytes(row["content_raw"]).decode("utf-8", "surrogatepass")
    return load(row["parts"])


def as_create(message: Message) -> MessageCreate:
    """The message's fields as an append takes them (to rewrite a streamed message's row)."""
    return MessageCreate.model_construct(
        id=message.id,
        role=message.role,
        content=message.content,
        name=message.name,
        tool_calls=message.tool_calls,
        tool_call_id=message.tool_call_id,
        status=message.status,
        metadata=message.metadata,
        references=message.references,
    )
