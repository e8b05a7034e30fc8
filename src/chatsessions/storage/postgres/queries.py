"""Every statement the PostgreSQL store runs, as named constants.

Hot changes are single statements run outside an explicit transaction: one
round trip, and PostgreSQL makes each statement atomic by itself. Row locks
do the serialising: an `UPDATE` of a session row waits for a concurrent
change of that row to commit, then re-reads it, so `RETURNING` always gives
the newest counters. A statement that changed nothing also answers with the
row as its snapshot saw it (`found = false`), so the caller can tell "no such
session" (no row) from "stale If-Match" (a row whose version fails the check)
in the same answer.

`$n::bigint[]` versions are an `If-Match` list; NULL means "any version".
"""

from __future__ import annotations

from chatsessions.models import Order, SessionCursor, SessionFilter
from chatsessions.storage.common import listing_sql
from chatsessions.storage.postgres.rows import moment

SESSION_COLUMNS = (
    "id, user_id, document_id, section_id, title, settings, metadata, "
    "message_count, last_seq, version, created_at, updated_at, expires_at, pinned"
)
# A live session: not past its expires_at and, unless pinned, not idle for the idle rule's
# seconds (the connection setting `chatsessions.idle_seconds`, empty: no idle rule). Every
# read and change goes through it, so an expired session is gone at once, by time; the
# sweeper deletes the rows later.
IDLE_SETTING = "chatsessions.idle_seconds"
_IDLE_CUTOFF = f"now() - nullif(current_setting('{IDLE_SETTING}', true), '')::float8 * interval '1 second'"
ALIVE = (
    "({p}expires_at IS NULL OR {p}expires_at > now()) "
    "AND ({p}pinned OR coalesce({p}updated_at > " + _IDLE_CUTOFF.replace("{", "{{").replace("}", "}}") + ", true))"
)
_ALIVE = ALIVE.format(p="")
_S_ALIVE = ALIVE.format(p="s.")
_S_SESSION_COLUMNS = ", ".join(f"s.{column}" for column in SESSION_COLUMNS.split(", "))
# The columns an append writes for each message, beside seq and the times, in `rows.message_arrays`
# order, with their types (jsonb and tsvector travel as text).
MESSAGE_FIELDS = (
    ("role", "text"),
    ("content", "text"),
    ("content_raw", "bytea"),
    ("metadata", "jsonb"),
    ("refs", "jsonb"),
    ("parts", "jsonb"),
    ("client_id", "text"),
    ("name", "text"),
    ("tool_calls", "jsonb"),
    ("tool_call_id", "text"),
    ("status", "text"),
    ("words", "tsvector"),
)
_AS_TEXT = ("jsonb", "tsvector")
_FIELD_NAMES = ", ".join(name for name, _ in MESSAGE_FIELDS)
_FIELD_VALUES = ", ".join(f"m.{name}::{kind}" if kind in _AS_TEXT else f"m.{name}" for name, kind in MESSAGE_FIELDS)


def _unnest(first: int) -> str:
    """The array parameters of MESSAGE_FIELDS, numbered from `first`."""
    return ", ".join(
        f"${first + i}::{'text' if kind in _AS_TEXT else kind}[]" for i, (_, kind) in enumerate(MESSAGE_FIELDS)
    )


# What a read gives of a message (not its words).
MESSAGE_COLUMNS = "seq, created_at, updated_at, " + ", ".join(name for name, _ in MESSAGE_FIELDS if name != "words")

SELECT_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = $1 AND id = $2 AND {_ALIVE}"
LOCK_SESSION = SELECT_SESSION + " FOR UPDATE"
# Any row with that id, expired or not (import, and freeing the id of an expired session).
LOCK_ANY_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE tenant = $1 AND id = $2 FOR UPDATE"

# Arguments: tenant, id, then `rows.session_values`.
_INSERT_SESSION = """
INSERT INTO sessions (tenant, id, user_id, document_id, section_id, title, settings, metadata,
                      message_count, last_seq, version, created_at, updated_at, expires_at, pinned)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9, $10, $11, $12, $13, $14, $15)
ON CONFLICT (tenant, id) DO NOTHING
"""
INSERT_SESSION = _INSERT_SESSION
# _INSERT_SESSION's arguments, then key, fingerprint, status, body, headers, ttl: the answer under
# an Idempotency-Key commits with the session it created, in the same statement. One row (true) when
# created, none when the id exists.
INSERT_SESSION_ANSWERED = f"""
WITH created AS ({_INSERT_SESSION} RETURNING true),
answered AS (
    INSERT INTO idempotency_keys AS k (tenant, key, fingerprint, status, body, headers, expires_at, session_id)
    SELECT $1, $16, $17, $18, $19, $20::jsonb, now() + make_interval(secs => $21), $2 FROM created
    ON CONFLICT (tenant, key) DO UPDATE
    SET status = EXCLUDED.status, body = EXCLUDED.body, headers = EXCLUDED.headers, expires_at = EXCLUDED.expires_at,
        session_id = EXCLUDED.session_id
)
SELECT true FROM created
"""
# _INSERT_SESSION's arguments. Created: one row (true, the new row). Exists: (false, the row as this
# statement's snapshot sees it), or no row when the row that won the race is newer than that snapshot.
GET_OR_INSERT_SESSION = f"""
WITH created AS ({_INSERT_SESSION} RETURNING {SESSION_COLUMNS})
SELECT true AS created, {SESSION_COLUMNS} FROM created
UNION ALL
SELECT false, {SESSION_COLUMNS} FROM sessions
WHERE tenant = $1 AND id = $2 AND NOT EXISTS (SELECT FROM created)
"""

# GET_OR_INSERT_SESSION for many sessions at once (each at most once): arguments one array per
# argument of _INSERT_SESSION. Answers, for each session `i` (1-based), as GET_OR_INSERT_SESSION
# does. Rows go in in (tenant, id) order, so two batches never wait for each other in a cycle.
CREATE_BATCH = f"""
WITH wanted AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::timestamptz[],
                         $13::timestamptz[], $14::timestamptz[], $15::boolean[])
        WITH ORDINALITY AS w(tenant, id, user_id, document_id, section_id, title, settings, metadata,
                             message_count, last_seq, version, created_at, updated_at, expires_at, pinned, i)
),
created AS (
    INSERT INTO sessions (tenant, id, user_id, document_id, section_id, title, settings, metadata,
                          message_count, last_seq, version, created_at, updated_at, expires_at, pinned)
    SELECT tenant, id, user_id, document_id, section_id, title, settings::jsonb, metadata::jsonb,
           message_count, last_seq, version, created_at, updated_at, expires_at, pinned
    FROM wanted ORDER BY tenant, id
    ON CONFLICT (tenant, id) DO NOTHING
    RETURNING tenant, id
)
SELECT w.i, c.id IS NOT NULL AS created, {_S_SESSION_COLUMNS}
FROM wanted w
LEFT JOIN created c ON c.tenant = w.tenant AND c.id = w.id
LEFT JOIN sessions s ON c.id IS NULL AND s.tenant = w.tenant AND s.id = w.id
WHERE c.id IS NOT NULL OR s.id IS NOT NULL
"""

# Arguments: tenant, id, then `rows.session_links`, version, updated_at.
UPDATE_SESSION = """
UPDATE sessions
SET user_id = $3, document_id = $4, section_id = $5, title = $6, settings = $7::jsonb, metadata = $8::jsonb,
    expires_at = $9, pinned = $10, version = $11, updated_at = $12
WHERE tenant = $1 AND id = $2
"""
# Arguments: tenant, id, If-Match versions. The deleted row's version (found = true), or see the module doc.
# Stored answers that held the session's content go with it.
DELETE_SESSION = f"""
WITH deleted AS (
    DELETE FROM sessions
    WHERE tenant = $1 AND id = $2 AND ($3::bigint[] IS NULL OR version = ANY($3::bigint[])) AND {_ALIVE}
    RETURNING version, user_id, document_id, section_id
),
answers AS (
    DELETE FROM idempotency_keys WHERE tenant = $1 AND session_id = $2 AND EXISTS (SELECT FROM deleted)
)
SELECT true AS found, version, user_id, document_id, section_id FROM deleted
UNION ALL
SELECT false, version, user_id, document_id, section_id FROM sessions
WHERE tenant = $1 AND id = $2 AND {_ALIVE} AND NOT EXISTS (SELECT FROM deleted)
"""
DELETE_ANY_SESSION = "DELETE FROM sessions WHERE tenant = $1 AND id = $2"
# Arguments: tenant, id. Deletes the session if it has expired (its id is free again); true if it did.
DELETE_IF_EXPIRED = f"""
WITH gone AS (DELETE FROM sessions WHERE tenant = $1 AND id = $2 AND NOT ({_ALIVE}) RETURNING id),
answers AS (DELETE FROM idempotency_keys k WHERE k.session_id = ANY(ARRAY(SELECT id FROM gone)) AND k.tenant = $1)
SELECT count(*) > 0 FROM gone
"""
# Arguments: tenant, user_id, document_id (NULL: any). Erasure: how many sessions went.
DELETE_USER_SESSIONS = """
WITH gone AS (
    DELETE FROM sessions WHERE tenant = $1 AND user_id = $2 AND ($3::text IS NULL OR document_id = $3)
    RETURNING id
),
answers AS (DELETE FROM idempotency_keys k WHERE k.session_id = ANY(ARRAY(SELECT id FROM gone)) AND k.tenant = $1),
recorded AS (DELETE FROM events e WHERE e.tenant = $1 AND e.session_id = ANY(ARRAY(SELECT id FROM gone)))
SELECT count(*) FROM gone
"""
# The sweeper: up to $1 expired sessions (any tenant), rows other replicas are busy with skipped;
# messages and citations go by cascade, stored answers and recorded events (they hold the
# content) here. Answers how many went.
_PURGE = """
WITH doomed AS (
    SELECT tenant, id FROM sessions WHERE {expired} LIMIT $1 FOR UPDATE SKIP LOCKED
),
gone AS (
    DELETE FROM sessions s USING doomed d WHERE s.tenant = d.tenant AND s.id = d.id RETURNING s.tenant, s.id
),
answers AS (
    DELETE FROM idempotency_keys k
    WHERE k.session_id = ANY(ARRAY(SELECT id FROM gone)) AND (k.tenant, k.session_id) IN (SELECT tenant, id FROM gone)
),
recorded AS (
    DELETE FROM events e
    WHERE e.tenant = ANY(ARRAY(SELECT tenant FROM gone)) AND e.session_id = ANY(ARRAY(SELECT id FROM gone))
      AND (e.tenant, e.session_id) IN (SELECT tenant, id FROM gone)
)
SELECT count(*) FROM gone
"""
PURGE_BY_TIME = _PURGE.format(expired="expires_at <= now()")
PURGE_BY_IDLE = _PURGE.format(expired=f"NOT pinned AND updated_at <= {_IDLE_CUTOFF}")

# Arguments: tenant, id, count, now, If-Match versions, then `rows.message_arrays`.
# The session's counters move and its messages go in, in one statement: seqs follow the
# locked row's last_seq, and every message's created_at is the session's new updated_at,
# which never moves back (replicas' clocks may disagree a little).
APPEND = f"""
WITH changed AS (
    UPDATE sessions
    SET message_count = message_count + $3::bigint, last_seq = last_seq + $3::bigint, version = version + 1,
        updated_at = greatest($4::timestamptz, updated_at)
    WHERE tenant = $1 AND id = $2 AND ($5::bigint[] IS NULL OR version = ANY($5::bigint[])) AND {_ALIVE}
    RETURNING {SESSION_COLUMNS}
),
added AS (
    INSERT INTO messages (tenant, session_id, seq, created_at, updated_at, {_FIELD_NAMES})
    SELECT $1, $2, c.last_seq - $3::bigint + m.n, c.updated_at, c.updated_at, {_FIELD_VALUES}
    FROM changed c, unnest({_unnest(6)}) WITH ORDINALITY AS m({_FIELD_NAMES}, n)
)
SELECT true AS found, {SESSION_COLUMNS} FROM changed
UNION ALL
SELECT false, {SESSION_COLUMNS} FROM sessions
WHERE tenant = $1 AND id = $2 AND {_ALIVE} AND NOT EXISTS (SELECT FROM changed)
"""

# APPEND for many sessions at once (each at most once), in one statement: arguments tenants, ids,
# counts, expected versions (NULL: any), now, then per message: the index (1-based) of its append,
# its place in that append, and the columns of `rows.message_arrays`. Answers one row per append
# whose session exists: `i` its index, then as APPEND. A batch never waits for a row lock: it skips
# a session that another transaction holds (that append answers `found = false` with a version
# that passes, and runs again by itself), so one busy session never holds up the others, and
# batches cannot deadlock.
APPEND_BATCH = f"""
WITH wanted AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::bigint[])
        WITH ORDINALITY AS w(tenant, id, n, expected, i)
),
locked AS (
    SELECT s.tenant, s.id, w.n, w.expected, w.i
    FROM sessions s JOIN wanted w ON s.tenant = w.tenant AND s.id = w.id
    WHERE {_S_ALIVE}
    FOR UPDATE OF s SKIP LOCKED
),
changed AS (
    UPDATE sessions s
    SET message_count = s.message_count + l.n, last_seq = s.last_seq + l.n, version = s.version + 1,
        updated_at = greatest($5::timestamptz, s.updated_at)
    FROM locked l
    WHERE s.tenant = l.tenant AND s.id = l.id AND (l.expected IS NULL OR s.version = l.expected)
    RETURNING l.i, l.n, s.tenant, {_S_SESSION_COLUMNS}
),
added AS (
    INSERT INTO messages (tenant, session_id, seq, created_at, updated_at, {_FIELD_NAMES})
    SELECT c.tenant, c.id, c.last_seq - c.n + m.ord, c.updated_at, c.updated_at, {_FIELD_VALUES}
    FROM changed c
    JOIN unnest($6::bigint[], $7::bigint[], {_unnest(8)}) AS m(i, ord, {_FIELD_NAMES}) ON m.i = c.i
)
SELECT i, true AS found, {SESSION_COLUMNS} FROM changed
UNION ALL
SELECT w.i, false, {_S_SESSION_COLUMNS}
FROM wanted w JOIN sessions s ON s.tenant = w.tenant AND s.id = w.id
WHERE NOT EXISTS (SELECT FROM changed c WHERE c.i = w.i)
"""

# Arguments: tenant, id, client message ids. Run after LOCK_SESSION: no append slips in before the insert.
FIND_CLIENT_IDS = "SELECT client_id, seq FROM messages WHERE tenant = $1 AND session_id = $2 AND client_id = ANY($3)"

# Arguments: tenant, session id, created_at, then `rows.citation_arrays`. Runs in the append's
# transaction, after APPEND (citations reference their message).
INSERT_CITATIONS = """
INSERT INTO citations (tenant, session_id, created_at, seq, ordinal, doc_id, reference)
SELECT $1, $2, $3, c.seq, c.ordinal, c.doc_id, c.reference::jsonb
FROM unnest($4::bigint[], $5::integer[], $6::text[], $7::text[]) AS c(seq, ordinal, doc_id, reference)
"""

# Arguments: the tsquery (text.tsquery_literal), limit, offset, tenant, then the session filters. Only
# (session, seq, rank) of the matches are sorted; contents are read for the page alone.
SEARCH = """
SELECT m.session_id, m.seq, m.role, m.created_at, m.content, m.content_raw, m.parts
FROM (
    SELECT m.tenant, m.session_id, m.seq, ts_rank(m.words, $1::tsquery) AS score
    FROM messages m{join}
    WHERE m.words @@ $1::tsquery{filters}
    ORDER BY score DESC, m.session_id, m.seq
    LIMIT $2 OFFSET $3
) h
JOIN messages m ON m.tenant = h.tenant AND m.session_id = h.session_id AND m.seq = h.seq
ORDER BY h.score DESC, h.session_id, h.seq
"""
SEARCH_JOIN = " JOIN sessions s ON s.tenant = m.tenant AND s.id = m.session_id"
SESSION_ALIVE = " AND " + _S_ALIVE

# Both run after LOCK_SESSION, in its transaction, so no append slips in between.
CLEAR_MESSAGES = "DELETE FROM messages WHERE tenant = $1 AND session_id = $2"
DELETE_ANSWERS = "DELETE FROM idempotency_keys WHERE tenant = $1 AND session_id = $2"
# Arguments: tenant, id, seq. After LOCK_SESSION; citations go by cascade.
DELETE_MESSAGE = "DELETE FROM messages WHERE tenant = $1 AND session_id = $2 AND seq = $3 RETURNING seq"
# Arguments: tenant, id, version, updated_at.
MESSAGE_DELETED_COUNTERS = """
UPDATE sessions SET message_count = message_count - 1, version = $3, updated_at = $4 WHERE tenant = $1 AND id = $2
"""
# Arguments: tenant, session id, then arrays of seq, created_at, updated_at and of `MESSAGE_FIELDS`:
# an imported session's messages exactly as exported.
IMPORT_MESSAGES = f"""
INSERT INTO messages (tenant, session_id, seq, created_at, updated_at, {_FIELD_NAMES})
SELECT $1, $2, m.seq, m.created_at, m.updated_at, {_FIELD_VALUES}
FROM unnest($3::bigint[], $4::timestamptz[], $5::timestamptz[], {_unnest(6)})
    AS m(seq, created_at, updated_at, {_FIELD_NAMES})
"""
# Arguments: tenant, session id, then arrays of seq, created_at, ordinal, doc_id, reference.
IMPORT_CITATIONS = """
INSERT INTO citations (tenant, session_id, seq, created_at, ordinal, doc_id, reference)
SELECT $1, $2, c.seq, c.created_at, c.ordinal, c.doc_id, c.reference::jsonb
FROM unnest($3::bigint[], $4::timestamptz[], $5::integer[], $6::text[], $7::text[])
    AS c(seq, created_at, ordinal, doc_id, reference)
"""
# Arguments: tenant, after id, limit, user_id, document_id, session_id (NULL: any). Export order: by id.
EXPORT_SESSIONS = f"""
SELECT {SESSION_COLUMNS} FROM sessions
WHERE tenant = $1 AND id > $2 AND ($4::text IS NULL OR user_id = $4) AND ($5::text IS NULL OR document_id = $5)
  AND ($6::text IS NULL OR id = $6) AND {_ALIVE}
ORDER BY id LIMIT $3
"""
# Arguments: tenant, id, version, updated_at.
CLEAR_COUNTERS = "UPDATE sessions SET message_count = 0, version = $3, updated_at = $4 WHERE tenant = $1 AND id = $2"


def _page_sql(order: str) -> str:
    # One statement, one snapshot: whether the session exists and its page agree. Arguments:
    # tenant, id, after, before, limit, most content bytes. `kept` says whether a message is in
    # the page: the first always is, a later one while the running total of content bytes stays
    # within the bound; the content of a message left out is not sent (octet_length does not
    # read a value that was moved out of line).
    return f"""
SELECT m.seq, m.role, m.created_at, m.updated_at, m.metadata, m.refs, m.kept, m.client_id, m.name,
       m.tool_calls, m.tool_call_id, m.status,
       CASE WHEN m.kept THEN m.content END AS content, CASE WHEN m.kept THEN m.content_raw END AS content_raw,
       CASE WHEN m.kept THEN m.parts END AS parts
FROM sessions s
LEFT JOIN LATERAL (
    SELECT p.*, (p.n = 1 OR p.running <= $6) AS kept
    FROM (
        SELECT {MESSAGE_COLUMNS},
               row_number() OVER w AS n,
               sum(coalesce(octet_length(content), octet_length(content_raw), octet_length(parts::text), 0))
                   OVER w AS running
        FROM (
            SELECT {MESSAGE_COLUMNS} FROM messages
            WHERE tenant = s.tenant AND session_id = s.id AND seq > $3 AND seq < $4
            ORDER BY seq {order} LIMIT $5
        ) page
        WINDOW w AS (ORDER BY seq {order})
    ) p
) m ON true
WHERE s.tenant = $1 AND s.id = $2 AND {_S_ALIVE}
ORDER BY m.seq {order}
"""


PAGE_ASC = _page_sql("ASC")
PAGE_DESC = _page_sql("DESC")
# Arguments: tenant, id, seq. No row: no session; a row of NULLs: no such message.
GET_MESSAGE = f"""
SELECT {", ".join(f"m.{column}" for column in MESSAGE_COLUMNS.split(", "))}
FROM sessions s
LEFT JOIN messages m ON m.tenant = s.tenant AND m.session_id = s.id AND m.seq = $3
WHERE s.tenant = $1 AND s.id = $2 AND {_S_ALIVE}
"""

CLAIM_KEY = """
INSERT INTO idempotency_keys AS k (tenant, key, fingerprint, status, body, headers, expires_at)
VALUES ($1, $2, $3, NULL, NULL, NULL, now() + make_interval(secs => $4))
ON CONFLICT (tenant, key) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, status = NULL, body = NULL, headers = NULL, expires_at = EXCLUDED.expires_at
WHERE k.expires_at <= now()
RETURNING true
"""
READ_KEY = """
SELECT fingerprint, status, body, headers FROM idempotency_keys
WHERE tenant = $1 AND key = $2 AND expires_at > now()
"""
# Arguments: tenant, key, fingerprint, status, body, headers, ttl, session id (whose content it may hold).
STORE_ANSWER = """
INSERT INTO idempotency_keys AS k (tenant, key, fingerprint, status, body, headers, expires_at, session_id)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, now() + make_interval(secs => $7), $8)
ON CONFLICT (tenant, key) DO UPDATE
SET status = EXCLUDED.status, body = EXCLUDED.body, headers = EXCLUDED.headers, expires_at = EXCLUDED.expires_at,
    session_id = EXCLUDED.session_id
"""
# Only a claim is released: an answer that committed with its change stays, even
# when the caller saw the commit fail and now reports a 5xx.
RELEASE_KEY = "DELETE FROM idempotency_keys WHERE tenant = $1 AND key = $2 AND status IS NULL"
PURGE_KEYS = "DELETE FROM idempotency_keys WHERE expires_at <= now()"

IS_WRITABLE = "SELECT NOT pg_is_in_recovery()"


def listing_query(
    tenant: str, *, filters: SessionFilter, limit: int, cursor: SessionCursor | None
) -> tuple[str, list[object]]:
    """SQL and arguments of one listing page (see `common.listing_sql`)."""
    return listing_sql(
        columns=SESSION_COLUMNS,
        filters=filters,
        limit=limit,
        cursor=cursor,
        placeholder=lambda n: f"${n}",
        moment=moment,
        tenant=tenant,
        alive=(_ALIVE, []),
    )


def page_query(order: Order) -> str:
    """SQL of a message page: arguments tenant, session id, after, before, limit."""
    return PAGE_ASC if order is Order.asc else PAGE_DESC


# --- change events -----------------------------------------------------------------

# Arguments: one array per column (tenant, session_id, version, type, data, user_id, document_id,
# section_id). The last statement of a changing transaction: it holds event_head's row lock until
# the commit, so ids follow commit order across every replica.
RECORD_EVENTS = """
WITH head AS (UPDATE event_head SET id = id + cardinality($1::text[]) RETURNING id)
INSERT INTO events (id, tenant, session_id, version, type, data, user_id, document_id, section_id)
SELECT head.id - cardinality($1::text[]) + e.n, e.tenant, e.session_id, e.version, e.type, e.data,
       e.user_id, e.document_id, e.section_id
FROM head, unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[])
    WITH ORDINALITY AS e(tenant, session_id, version, type, data, user_id, document_id, section_id, n)
"""
FORGET_SESSION_EVENTS = "DELETE FROM events WHERE tenant = $1 AND session_id = $2"
EVENT_COLUMNS = "id, tenant, session_id, version, type, data, user_id, document_id, section_id"
INCARNATION_FLOOR = """
SELECT coalesce(max(id), 0) FROM events WHERE tenant = $1 AND session_id = $2 AND type = 'session.deleted'
"""
SESSION_EVENTS = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE tenant = $1 AND session_id = $2 AND version > $3 AND id > $4 ORDER BY version LIMIT $5
"""
TENANT_EVENTS = f"""
SELECT {EVENT_COLUMNS} FROM events
WHERE tenant = $1 AND id > $2 AND ($3::text IS NULL OR user_id = $3) AND ($4::text IS NULL OR document_id = $4)
  AND ($5::text IS NULL OR section_id = $5)
ORDER BY id LIMIT $6
"""
EVENTS_AFTER = f"SELECT {EVENT_COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2"
EVENT_HEAD = "SELECT id FROM event_head"
LOWEST_EVENT = "SELECT min(id) FROM events"
PRUNE_EVENTS = """
DELETE FROM events WHERE id IN (
    SELECT id FROM events
    WHERE id <= (SELECT id FROM events WHERE created_at < now() - make_interval(secs => $1)
                 ORDER BY created_at DESC LIMIT 1)
    ORDER BY id LIMIT $2
)
"""

# --- streamed messages ---------------------------------------------------------------

LOCK_MESSAGE = f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE tenant = $1 AND session_id = $2 AND seq = $3 FOR UPDATE"
# Arguments: tenant, session id, seq, updated_at, then one value per MESSAGE_FIELDS.
_REWRITE_VALUES = ", ".join(
    f"${5 + i}::text::{kind}" if kind in _AS_TEXT else f"${5 + i}::{kind}" for i, (_, kind) in enumerate(MESSAGE_FIELDS)
)
REWRITE_MESSAGE = f"""
UPDATE messages SET updated_at = $4, ({_FIELD_NAMES}) = ({_REWRITE_VALUES})
WHERE tenant = $1 AND session_id = $2 AND seq = $3
"""
STEP_SESSION = "UPDATE sessions SET version = $3, updated_at = $4 WHERE tenant = $1 AND id = $2"
IDLE_STREAMS = """
SELECT tenant, session_id, seq FROM messages
WHERE status = 'in_progress' AND coalesce(updated_at, created_at) < now() - make_interval(secs => $1)
ORDER BY coalesce(updated_at, created_at) LIMIT $2
"""
