"""Logic every backend shares: building sessions and messages, paging arithmetic."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from chatsessions.models import (
    Message,
    MessageCreate,
    MessageQuery,
    Order,
    Session,
    SessionCreate,
    SessionCursor,
    SessionSettings,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def new_session(data: SessionCreate, *, session_id: str | None = None, now: datetime) -> Session:
    return Session(
        id=session_id or data.id or str(uuid.uuid4()),
        user_id=data.user_id,
        document_id=data.document_id,
        section_id=data.section_id,
        title=data.title,
        settings=data.settings.model_copy() if data.settings else SessionSettings(),
        metadata=dict(data.metadata),
        message_count=0,
        last_seq=0,
        version=1,
        created_at=now,
        updated_at=now,
    )


def new_messages(messages: list[MessageCreate], *, first_seq: int, now: datetime) -> list[Message]:
    return [
        Message(
            seq=first_seq + i,
            role=m.role,
            content=m.content,
            created_at=now,
            metadata=m.metadata,
            references=m.references,
        )
        for i, m in enumerate(messages)
    ]


def after_append(session: Session, added: int, *, now: datetime) -> Session:
    return session.model_copy(
        update={
            "message_count": session.message_count + added,
            "last_seq": session.last_seq + added,
            "version": session.version + 1,
            "updated_at": now,
        }
    )


def after_clear(session: Session, *, now: datetime) -> Session:
    return session.model_copy(update={"message_count": 0, "version": session.version + 1, "updated_at": now})


def page_range(query: MessageQuery, *, first_seq: int, last_seq: int) -> tuple[range, bool]:
    """The seqs of one page over the live seqs `first_seq..last_seq` (contiguous).

    Returns:
        The seqs in answer order, and whether more lie beyond the page in the
        same direction within the `after`/`before` bounds.
    """
    lo = first_seq if query.after is None else max(first_seq, query.after + 1)
    hi = last_seq if query.before is None else min(last_seq, query.before - 1)
    if lo > hi:
        return range(0), False
    if query.order is Order.asc:
        end = min(hi, lo + query.limit - 1)
        return range(lo, end + 1), end < hi
    start = max(lo, hi - query.limit + 1)
    return range(hi, start - 1, -1), start > lo


def to_us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def listing_key(updated_at: datetime, session_id: str) -> tuple[int, str]:
    """Sort key for session listings: newest first, then id (exact, in microseconds)."""
    return (-to_us(updated_at), session_id)


def is_after_cursor(cursor: SessionCursor | None, updated_at: datetime, session_id: str) -> bool:
    if cursor is None:
        return True
    return listing_key(updated_at, session_id) > listing_key(cursor.updated_at, cursor.id)
