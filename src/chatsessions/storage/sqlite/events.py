"""The events table of the sqlite store: recording an event in a change, replaying, pruning.

`record_event` is the one call a change makes to describe itself: it inserts the
row in the change's transaction and queues the event for publication after the
commit (a change rolled back to its savepoint takes its events with it).
"""

from __future__ import annotations

from typing import Any

import apsw

from chatsessions.errors import StorageCorrupted
from chatsessions.events import ChangeEvent, EventDraft, SessionReplay, TenantFilter, TenantReplay
from chatsessions.models import utcnow
from chatsessions.storage.common import to_us
from chatsessions.storage.sqlite import rows
from chatsessions.storage.sqlite.writer import Tx

INSERT_EVENT = """
INSERT INTO events (tenant, session_id, version, type, data, user_id, document_id, section_id, created_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id
"""
EVENT_COLUMNS = "id, tenant, session_id, version, type, data, user_id, document_id, section_id"
# Erasure: a deleted (or cleared) session's recorded content goes with it.
FORGET_SESSION = "DELETE FROM events WHERE tenant = ? AND session_id = ?"
# Events of an earlier session with the same id end at its deletion event.
INCARNATION_FLOOR = """
SELECT coalesce(max(id), 0) FROM events WHERE tenant = ? AND session_id = ? AND type = 'session.deleted'
"""
SESSION_EVENTS = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE tenant = ? AND session_id = ? AND version > ? AND id > ? ORDER BY version LIMIT ?
"""
TENANT_EVENTS = f"SELECT {EVENT_COLUMNS} FROM events WHERE tenant = ? AND id > ?{{filters}} ORDER BY id LIMIT ?"
HIGHEST_ID = "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
LOWEST_ID = "SELECT min(id) FROM events"
PRUNE_CUTOFF = "SELECT id FROM events WHERE created_at < ? ORDER BY created_at DESC LIMIT 1"
PRUNE = "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE id <= ? ORDER BY id LIMIT ?)"


def record_event(tx: Tx, draft: EventDraft) -> ChangeEvent:
    """Insert the event of the change running in `tx`; it is published once the change committed."""
    values = (
        draft.tenant,
        draft.session_id,
        draft.version,
        draft.type,
        draft.data,
        draft.user_id,
        draft.document_id,
        draft.section_id,
        to_us(utcnow()),
    )
    (event_id,) = next(tx.conn.execute(INSERT_EVENT, values))
    event = ChangeEvent(event_id, draft)
    tx.events.append(event)
    return event


def forget_session(tx: Tx, tenant: str, session_id: str) -> None:
    """Delete every recorded event of the session (its deletion or clearing erases their content)."""
    tx.conn.execute(FORGET_SESSION, (tenant, session_id))


def _events(rows_: Any) -> list[ChangeEvent]:
    """Decode event rows; text SQLite cannot decode means a damaged page (SQLite keeps no checksum)."""
    try:
        return [_event_from(r) for r in rows_]
    except UnicodeDecodeError as exc:
        raise StorageCorrupted(f"the database is corrupt (an event's text cannot be decoded: {exc})") from exc


def _event_from(row: tuple[Any, ...]) -> ChangeEvent:
    event_id, tenant, session_id, version, kind, data, user_id, document_id, section_id = row
    return ChangeEvent(event_id, EventDraft(tenant, session_id, version, kind, data, user_id, document_id, section_id))


def read_session_events(
    conn: apsw.Connection, tenant: str, session_id: str, *, after: int, limit: int
) -> SessionReplay:
    """Events of the session with a version greater than `after` (at most `limit`), in one snapshot."""
    with conn:  # one read transaction: the session row and its events agree
        row = next(conn.execute(rows.SELECT_SESSION, (tenant, session_id)), None)
        if row is None:
            return SessionReplay(None, [], False)
        session = rows.head_from(row).session
        if after == session.version:
            return SessionReplay(session, [], True)
        if not 0 <= after < session.version:
            return SessionReplay(session, [], False)
        (floor,) = next(conn.execute(INCARNATION_FLOOR, (tenant, session_id)))
        events = _events(conn.execute(SESSION_EVENTS, (tenant, session_id, after, floor, limit)))
    return SessionReplay(session, events, bool(events) and events[0].version == after + 1)


def read_tenant_events(
    conn: apsw.Connection, tenant: str, *, after: int | None, filters: TenantFilter, limit: int
) -> TenantReplay:
    """The tenant's events with an id greater than `after` (None: none, only the head), oldest first."""
    with conn:
        found = next(conn.execute(HIGHEST_ID), None)
        head = int(found[0]) if found is not None else 0
        if after is None:
            return TenantReplay([], True, head)
        (lowest,) = next(conn.execute(LOWEST_ID))
        # Pruning removes a prefix of ids: a position before what is left was pruned past.
        replayable = after == head or (0 <= after < head and lowest is not None and after >= lowest - 1)
        if not replayable:
            return TenantReplay([], False, head)
        clauses = ""
        args: list[Any] = [tenant, after]
        for column in ("user_id", "document_id", "section_id"):
            value = getattr(filters, column)
            if value is not None:
                clauses += f" AND {column} = ?"
                args.append(value)
        args.append(limit)
        events = _events(conn.execute(TENANT_EVENTS.format(filters=clauses), args))
    return TenantReplay(events, True, head)


def prune_events(tx: Tx, *, older_than_us: int, batch: int) -> int:
    """Delete up to `batch` of the oldest events recorded before `older_than_us`; return how many."""
    found = next(tx.conn.execute(PRUNE_CUTOFF, (older_than_us,)), None)
    if found is None:
        return 0
    tx.conn.execute(PRUNE, (found[0], batch))
    return tx.conn.changes()
