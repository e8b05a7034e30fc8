"""Logic every backend shares: building sessions and messages, paging arithmetic."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from chatsessions.errors import MessageExists, PreconditionFailed
from chatsessions.models import (
    Citation,
    CitationCursor,
    CitationFilter,
    CitationListing,
    Message,
    MessageCreate,
    MessageQuery,
    Order,
    Precondition,
    Session,
    SessionCreate,
    SessionCursor,
    SessionFilter,
    SessionListing,
    SessionSettings,
    utcnow,
)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def new_session(data: SessionCreate, *, session_id: str | None = None, now: datetime) -> Session:
    return Session(
        expires_at=data.expires_at,
        pinned=data.pinned,
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
    # Every field comes from a validated MessageCreate: built without validating its parts again.
    return [
        Message.model_construct(
            seq=first_seq + i,
            id=m.id,
            role=m.role,
            content=m.content,
            name=m.name,
            tool_calls=m.tool_calls,
            tool_call_id=m.tool_call_id,
            status=m.status,
            metadata=m.metadata,
            references=m.references,
            created_at=now,
            updated_at=now,
        )
        for i, m in enumerate(messages)
    ]


def check_message_ids(session_id: str, messages: list[MessageCreate], existing: dict[str, int]) -> None:
    """Raise MessageExists for a client message id the session has (`existing`: id -> seq) or the batch repeats."""
    seen: set[str] = set()
    for m in messages:
        if m.id is None:
            continue
        if m.id in existing:
            raise MessageExists(session_id, m.id, existing[m.id])
        if m.id in seen:
            raise MessageExists(session_id, m.id, None)
        seen.add(m.id)


def message_ids(messages: list[MessageCreate]) -> list[str]:
    """The client message ids of a batch (most appends have none)."""
    return [m.id for m in messages if m.id is not None]


def after_append(session: Session, added: int, *, now: datetime) -> Session:
    return session.model_copy(
        update={
            "message_count": session.message_count + added,
            "last_seq": session.last_seq + added,
            "version": session.version + 1,
            "updated_at": now,
        }
    )


def after_message_deleted(session: Session, *, now: datetime) -> Session:
    return session.model_copy(
        update={"message_count": session.message_count - 1, "version": session.version + 1, "updated_at": now}
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


# --- shared by the SQL backends ---------------------------------------------

MAX_SEQ = 2**63 - 1  # both databases keep seqs in a signed 64-bit integer


def check_precondition(session_id: str, version: int, if_match: Precondition | None) -> None:
    """Raise PreconditionFailed unless `if_match` (when given) holds for `version`."""
    if if_match is not None and not if_match.holds(version):
        raise PreconditionFailed(session_id, version)


def change_time(current: Session) -> datetime:
    """The time of a change to `current`: now, but never before its last change (clocks may step back)."""
    return max(utcnow(), current.updated_at)


def _alive_clause(alive: tuple[str, list[Any]], args: list[Any], placeholder: Callable[[int], str]) -> str:
    """A backend's "not expired" condition with its arguments appended to `args` (`{0}`, `{1}`... in it)."""
    numbers = []
    for value in alive[1]:
        args.append(value)
        numbers.append(placeholder(len(args)))
    return alive[0].format(*numbers)


def equalities(
    args: list[Any], placeholder: Callable[[int], str], column: Callable[[str], str], **values: str | None
) -> list[str]:
    """`<column> = <placeholder>` for each value given (None: no condition); the values join `args`."""
    found = []
    for name, value in values.items():
        if value is not None:
            args.append(value)
            found.append(f"{column(name)} = {placeholder(len(args))}")
    return found


def listing_sql(
    *,
    columns: str,
    filters: SessionFilter,
    limit: int,
    cursor: SessionCursor | None,
    placeholder: Callable[[int], str],
    moment: Callable[[datetime], Any],
    tenant: str,
    alive: tuple[str, list[Any]] = ("", []),
) -> tuple[str, list[Any]]:
    """SQL and arguments of one listing page over `sessions`: newest `updated_at` first, ties by id.

    Every filter is an equality on an indexed column (`(tenant, <filter>, updated_at DESC, id)`),
    and the cursor bounds the index scan, so a deep page costs no more than the first.
    `placeholder(n)` spells the n-th parameter (`$n`, `?n`); `moment` converts a timestamp to
    the column's type. Ask for `limit + 1` rows to learn whether another page follows.
    `alive` is the backend's condition for a session that has not expired, `{0}`, `{1}`...
    standing for its arguments.
    """
    args: list[Any] = [tenant]
    where = [f"tenant = {placeholder(1)}"]
    where += equalities(
        args,
        placeholder,
        str,
        user_id=filters.user_id,
        document_id=filters.document_id,
        section_id=filters.section_id,
    )
    if filters.pinned is not None:
        where.append("pinned" if filters.pinned else "NOT pinned")
    if alive[0]:
        where.append(_alive_clause(alive, args, placeholder))
    if filters.cited_doc_id is not None:
        args.append(filters.cited_doc_id)
        # Both backends keep (tenant, doc_id, ..., session_id) citations under one index.
        where.append(
            f"id IN (SELECT session_id FROM citations WHERE tenant = {placeholder(1)} "
            f"AND doc_id = {placeholder(len(args))})"
        )
    if cursor is not None:
        args += [moment(cursor.updated_at), cursor.id]
        t, i = placeholder(len(args) - 1), placeholder(len(args))
        # `updated_at <= t` bounds the index scan; the OR only sorts out equal timestamps.
        where.append(f"updated_at <= {t} AND (updated_at < {t} OR id > {i})")
    args.append(limit)
    sql = (
        f"SELECT {columns} FROM sessions WHERE {' AND '.join(where)} "
        f"ORDER BY updated_at DESC, id LIMIT {placeholder(len(args))}"
    )
    return sql, args


def listing_page(found: list[Session], limit: int) -> SessionListing:
    """The listing of up to `limit` sessions out of `found` (fetched with `limit + 1`)."""
    page = found[:limit]
    more = len(found) > limit and bool(page)
    return SessionListing(page, SessionCursor(page[-1].updated_at, page[-1].id) if more else None)


def seq_bounds(query: MessageQuery) -> tuple[int, int]:
    """`after` and `before` of a page as exclusive bounds inside the seq column's range."""
    after = 0 if query.after is None else min(max(query.after, 0), MAX_SEQ)
    before = MAX_SEQ if query.before is None else min(max(query.before, 0), MAX_SEQ)
    return after, before


def cited_doc_ids(references: list[Any] | None) -> list[tuple[int, str, Any]]:
    """(index, doc_id, reference) of each reference whose `doc_id` member is a string."""
    return [
        (i, ref["doc_id"], ref)
        for i, ref in enumerate(references or [])
        if isinstance(ref, dict) and isinstance(ref.get("doc_id"), str)
    ]


def citations_sql(
    *,
    tenant: str,
    doc_id: str,
    filters: CitationFilter,
    limit: int,
    cursor: CitationCursor | None,
    placeholder: Callable[[int], str],
    moment: Callable[[datetime], Any],
    alive: tuple[str, list[Any]] = ("", []),
) -> tuple[str, list[Any]]:
    """SQL and arguments of one citations page: newest first, then session id, seq and reference index.

    Both backends keep `citations (tenant, doc_id, created_at, session_id, seq, ordinal, reference)`
    under an index in exactly that order, so a page is one range scan. Rows are
    `(session_id, seq, created_at, ordinal, reference)`; ask for `limit + 1`.
    """
    args: list[Any] = [tenant, doc_id]
    where = [f"c.tenant = {placeholder(1)}", f"c.doc_id = {placeholder(2)}"]
    on_session = equalities(args, placeholder, "s.{}".format, user_id=filters.user_id, section_id=filters.section_id)
    join = " JOIN sessions s ON s.tenant = c.tenant AND s.id = c.session_id" if on_session or alive[0] else ""
    where += on_session
    if alive[0]:  # the citing session has not expired (`alive` as in `listing_sql`, on `s.`)
        where.append(_alive_clause(alive, args, placeholder))
    if cursor is not None:
        args += [moment(cursor.created_at), cursor.session_id, cursor.seq, cursor.ordinal]
        t, i, q, o = (placeholder(n) for n in range(len(args) - 3, len(args) + 1))
        where.append(
            f"c.created_at <= {t} AND (c.created_at < {t} OR (c.session_id, c.seq, c.ordinal) > ({i}, {q}, {o}))"
        )
    args.append(limit)
    sql = (
        f"SELECT c.session_id, c.seq, c.created_at, c.ordinal, c.reference FROM citations c{join} "
        f"WHERE {' AND '.join(where)} ORDER BY c.created_at DESC, c.session_id, c.seq, c.ordinal "
        f"LIMIT {placeholder(len(args))}"
    )
    return sql, args


def citation_listing(found: list[tuple[Citation, int]], limit: int) -> CitationListing:
    """The listing of up to `limit` citations out of `found` (fetched with `limit + 1`, with their ordinals)."""
    page = [citation for citation, _ in found[:limit]]
    if len(found) <= limit or not page:
        return CitationListing(page, None)
    last, ordinal = found[limit - 1]
    return CitationListing(page, CitationCursor(last.created_at, last.session_id, last.seq, ordinal))
