"""Streamed messages on the sqlite store: the message row a delta or PATCH rewrites, and the idle clock.

A message appended `in_progress` has a row in `streams` until it completes;
the row's `updated_at` is when it last changed, which the idle timeout reads.
Its words and citations go into the indexes only once it completes.
"""

from __future__ import annotations

import apsw

from chatsessions.errors import MessageNotFound
from chatsessions.models import Message
from chatsessions.storage.common import to_us
from chatsessions.storage.sqlite import rows

SELECT_MESSAGE_ROW = "SELECT rowid, body FROM messages WHERE session_pk = ? AND seq = ?"
UPDATE_MESSAGE = "UPDATE messages SET size = ?, body = ? WHERE rowid = ?"
TOUCH_STREAM = "INSERT OR REPLACE INTO streams (session_pk, seq, updated_at) VALUES (?, ?, ?)"
END_STREAM = "DELETE FROM streams WHERE session_pk = ? AND seq = ?"
DROP_STREAMS = "DELETE FROM streams WHERE session_pk = ?"
IDLE_STREAMS = """
SELECT s.tenant, s.id, st.seq FROM streams st JOIN sessions s ON s.pk = st.session_pk
WHERE st.updated_at < ? ORDER BY st.updated_at LIMIT ?
"""


def message_row(conn: apsw.Connection, session_id: str, pk: int, seq: int) -> tuple[int, Message]:
    """The message's rowid and the message; MessageNotFound."""
    row = next(conn.execute(SELECT_MESSAGE_ROW, (pk, seq)), None) if 0 < seq < 2**63 else None
    if row is None:
        raise MessageNotFound(session_id, seq)
    return row[0], rows.message_from(row[1])


def rewrite_message(conn: apsw.Connection, pk: int, rowid: int, message: Message) -> None:
    """Store the message's new body, and keep or end its idle clock."""
    values = rows.message_values(pk, message)
    conn.execute(UPDATE_MESSAGE, (values[2], values[4], rowid))
    if message.status.value == "in_progress":
        conn.execute(TOUCH_STREAM, (pk, message.seq, to_us(message.updated_at)))
    else:
        conn.execute(END_STREAM, (pk, message.seq))


def start_stream(conn: apsw.Connection, pk: int, message: Message) -> None:
    conn.execute(TOUCH_STREAM, (pk, message.seq, to_us(message.updated_at)))


def drop_streams(conn: apsw.Connection, pk: int) -> None:
    conn.execute(DROP_STREAMS, (pk,))


def idle_streams(conn: apsw.Connection, *, before_us: int, limit: int) -> list[tuple[str, str, int]]:
    """(tenant, session id, seq) of streamed messages unchanged since before `before_us`, oldest first."""
    return [(tenant, sid, seq) for tenant, sid, seq in conn.execute(IDLE_STREAMS, (before_us, limit))]
