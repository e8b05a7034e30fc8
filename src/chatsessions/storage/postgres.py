"""PostgreSQL backend: several replicas of the service share one database (asyncpg).

The tables live in one schema (`Settings.postgres_schema`), which every pooled
connection reaches through its `search_path`. `open()` builds and upgrades
that schema with the versioned steps of `MIGRATIONS` under an advisory lock,
so ten replicas starting together migrate once.

Every change runs in one transaction that first locks the session row
(`SELECT ... FOR UPDATE`): appends to one session are serialised across
replicas, `If-Match` is checked against the locked version, and the answer
kept under an Idempotency-Key commits together with the change. Nothing is
cached, so any replica reads what any other replica committed.

A database that cannot be reached (refused, reset, terminated, too slow)
surfaces as `StorageUnavailable` within `postgres_timeout_seconds`; the pool
replaces broken connections by itself, so the service recovers as soon as
the database is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import asyncpg.exceptions as pgerrors

from chatsessions.config import Settings
from chatsessions.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    InvalidInput,
    MessageNotFound,
    PreconditionFailed,
    SessionExists,
    SessionNotFound,
    StorageFull,
    StorageUnavailable,
)
from chatsessions.models import (
    IdempotencyRequest,
    Message,
    MessageCreate,
    MessageQuery,
    Order,
    Precondition,
    Role,
    Session,
    SessionCreate,
    SessionCursor,
    SessionFilter,
    SessionListing,
    SessionPatch,
    StoredResponse,
    utcnow,
)
from chatsessions.models import patch_session as apply_session_patch
from chatsessions.storage.common import after_append, after_clear, new_messages, new_session

log = logging.getLogger("chatsessions.postgres")

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

# A claimed Idempotency-Key whose request has not finished by then is free again:
# the replica that held it crashed. Far longer than any statement may run.
IDEMPOTENCY_LEASE_SECONDS = 60.0
# Expired Idempotency-Keys are deleted by the first claim after this many seconds.
IDEMPOTENCY_PURGE_INTERVAL = 60.0
_MAX_SEQ = 2**63 - 1  # bigint
# What PostgreSQL text cannot hold: NUL, and (not being UTF-8) unpaired surrogates.
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


# Append-only: a released step is never edited; a change of schema is a new step.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sessions, messages, idempotency keys",
        """
        CREATE TABLE sessions (
            tenant        text COLLATE "C" NOT NULL,
            id            text COLLATE "C" NOT NULL,
            user_id       text,
            document_id   text,
            section_id    text,
            title         text,
            settings      jsonb NOT NULL,
            metadata      jsonb NOT NULL,
            message_count bigint NOT NULL,
            last_seq      bigint NOT NULL,
            version       bigint NOT NULL,
            created_at    timestamptz NOT NULL,
            updated_at    timestamptz NOT NULL,
            PRIMARY KEY (tenant, id)
        );
        -- Listings: newest updated_at first, ties by id, optionally filtered by one link.
        CREATE INDEX sessions_recent ON sessions (tenant, updated_at DESC, id);
        CREATE INDEX sessions_by_user ON sessions (tenant, user_id, updated_at DESC, id);
        CREATE INDEX sessions_by_document ON sessions (tenant, document_id, updated_at DESC, id);
        CREATE INDEX sessions_by_section ON sessions (tenant, section_id, updated_at DESC, id);

        CREATE TABLE messages (
            tenant     text COLLATE "C" NOT NULL,
            session_id text COLLATE "C" NOT NULL,
            seq        bigint NOT NULL,
            role       text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
            -- content is text, unless PostgreSQL text cannot hold it (U+0000, an unpaired
            -- surrogate): then its UTF-8 bytes (surrogatepass) go to content_raw instead.
            content     text,
            content_raw bytea,
            created_at timestamptz NOT NULL,
            metadata   jsonb,
            refs       jsonb,
            -- The primary key serves message paging in both directions.
            CHECK ((content IS NULL) <> (content_raw IS NULL)),
            PRIMARY KEY (tenant, session_id, seq),
            FOREIGN KEY (tenant, session_id) REFERENCES sessions (tenant, id) ON DELETE CASCADE
        );

        CREATE TABLE idempotency_keys (
            tenant      text COLLATE "C" NOT NULL,
            key         text COLLATE "C" NOT NULL,
            fingerprint text NOT NULL,
            status      integer,  -- NULL while the first request runs (a lease until expires_at)
            body        bytea,
            headers     jsonb,
            expires_at  timestamptz NOT NULL,
            PRIMARY KEY (tenant, key)
        );
        CREATE INDEX idempotency_keys_expiry ON idempotency_keys (expires_at);
        """,
    ),
)

_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

_SESSION_COLUMNS = (
    "id, user_id, document_id, section_id, title, settings, metadata, "
    "message_count, last_seq, version, created_at, updated_at"
)

_SELECT_SESSION = f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE tenant = $1 AND id = $2"
_LOCK_SESSION = _SELECT_SESSION + " FOR UPDATE"
_INSERT_SESSION = """
INSERT INTO sessions (tenant, id, user_id, document_id, section_id, title, settings, metadata,
                      message_count, last_seq, version, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9, $10, $11, $12, $13)
ON CONFLICT (tenant, id) DO NOTHING
RETURNING true
"""
_UPDATE_SESSION = """
UPDATE sessions
SET user_id = $3, document_id = $4, section_id = $5, title = $6, settings = $7::jsonb, metadata = $8::jsonb,
    version = $9, updated_at = $10
WHERE tenant = $1 AND id = $2
"""
_UPDATE_COUNTERS = """
UPDATE sessions SET message_count = $3, last_seq = $4, version = $5, updated_at = $6
WHERE tenant = $1 AND id = $2
"""
_INSERT_MESSAGES = """
INSERT INTO messages (tenant, session_id, seq, role, content, content_raw, created_at, metadata, refs)
SELECT $1, $2, m.seq, m.role, m.content, m.content_raw, $3, m.metadata::jsonb, m.refs::jsonb
FROM unnest($4::bigint[], $5::text[], $6::text[], $7::bytea[], $8::text[], $9::text[])
     AS m(seq, role, content, content_raw, metadata, refs)
"""


def _page_sql(order: str) -> str:
    # One statement, one snapshot: whether the session exists and its page agree.
    return f"""
SELECT m.*
FROM sessions s
LEFT JOIN LATERAL (
    SELECT seq, role, content, content_raw, created_at, metadata, refs FROM messages
    WHERE tenant = s.tenant AND session_id = s.id AND seq > $3 AND seq < $4
    ORDER BY seq {order} LIMIT $5
) m ON true
WHERE s.tenant = $1 AND s.id = $2
ORDER BY m.seq {order}
"""


_PAGE_ASC = _page_sql("ASC")
_PAGE_DESC = _page_sql("DESC")
_GET_MESSAGE = """
SELECT m.seq, m.role, m.content, m.content_raw, m.created_at, m.metadata, m.refs
FROM sessions s
LEFT JOIN messages m ON m.tenant = s.tenant AND m.session_id = s.id AND m.seq = $3
WHERE s.tenant = $1 AND s.id = $2
"""
_CLAIM_KEY = """
INSERT INTO idempotency_keys AS k (tenant, key, fingerprint, status, body, headers, expires_at)
VALUES ($1, $2, $3, NULL, NULL, NULL, now() + make_interval(secs => $4))
ON CONFLICT (tenant, key) DO UPDATE
SET fingerprint = EXCLUDED.fingerprint, status = NULL, body = NULL, headers = NULL, expires_at = EXCLUDED.expires_at
WHERE k.expires_at <= now()
RETURNING true
"""
_READ_KEY = """
SELECT fingerprint, status, body, headers FROM idempotency_keys
WHERE tenant = $1 AND key = $2 AND expires_at > now()
"""
_STORE_ANSWER = """
INSERT INTO idempotency_keys AS k (tenant, key, fingerprint, status, body, headers, expires_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, now() + make_interval(secs => $7))
ON CONFLICT (tenant, key) DO UPDATE
SET status = EXCLUDED.status, body = EXCLUDED.body, headers = EXCLUDED.headers, expires_at = EXCLUDED.expires_at
"""
# Only a claim is released: an answer that committed with its change stays, even
# when the caller saw the commit fail and now reports a 5xx.
_RELEASE_KEY = "DELETE FROM idempotency_keys WHERE tenant = $1 AND key = $2 AND status IS NULL"
_PURGE_KEYS = "DELETE FROM idempotency_keys WHERE expires_at <= now()"

# Errors that mean "the database cannot serve us now", not "this request is wrong".
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS
    TimeoutError,  # connect, acquire or statement took longer than postgres_timeout_seconds
    asyncpg.InterfaceError,  # the connection closed under us; the pool is closing
    pgerrors.PostgresConnectionError,  # class 08
    pgerrors.OperatorInterventionError,  # class 57: terminated, shutting down, starting up
    pgerrors.InsufficientResourcesError,  # class 53: too many connections, out of memory
    pgerrors.TransactionRollbackError,  # class 40: deadlock, serialization failure
    pgerrors.InvalidAuthorizationSpecificationError,  # class 28
    pgerrors.InvalidCatalogNameError,  # the database does not exist (any more)
    pgerrors.ReadOnlySQLTransactionError,  # failed over to a standby
    pgerrors.PostgresSystemError,  # class 58: I/O error on the server
    pgerrors.InternalServerError,  # class XX
)
_UNSTORABLE = (
    "a field other than message content holds a character PostgreSQL cannot store"
    " (U+0000 or an unpaired surrogate); nothing was written"
)


@contextmanager
def _translate_errors() -> Iterator[None]:
    """Turn asyncpg and socket failures into the domain errors of `errors.py`."""
    try:
        yield
    except pgerrors.DataError as exc:  # class 22, and arguments asyncpg cannot encode
        raise InvalidInput(_UNSTORABLE) from exc
    except pgerrors.DiskFullError as exc:
        raise StorageFull() from exc
    except _UNAVAILABLE as exc:
        log.warning("PostgreSQL unavailable: %s: %s", type(exc).__name__, exc)
        raise StorageUnavailable(f"PostgreSQL is unavailable ({type(exc).__name__})") from exc


def listing_query(
    tenant: str, *, filters: SessionFilter, limit: int, cursor: SessionCursor | None
) -> tuple[str, list[Any]]:
    """SQL and arguments of one listing page: newest `updated_at` first, ties by id.

    Every filter is an equality on an indexed column; the cursor bounds the
    index scan, so a deep page costs no more than the first.
    """
    args: list[Any] = [tenant]
    where = ["tenant = $1"]
    for column, value in (
        ("user_id", filters.user_id),
        ("document_id", filters.document_id),
        ("section_id", filters.section_id),
    ):
        if value is not None:
            args.append(value)
            where.append(f"{column} = ${len(args)}")
    if cursor is not None:
        at = cursor.updated_at if cursor.updated_at.tzinfo else cursor.updated_at.replace(tzinfo=UTC)
        args += [at, cursor.id]
        t, i = len(args) - 1, len(args)
        # `updated_at <= $t` bounds the index scan; the OR only sorts out equal timestamps.
        where.append(f"updated_at <= ${t} AND (updated_at < ${t} OR id > ${i})")
    args.append(limit)
    sql = (
        f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE {' AND '.join(where)} "
        f"ORDER BY updated_at DESC, id LIMIT ${len(args)}"
    )
    return sql, args


def page_query(order: Order) -> str:
    """SQL of a message page: arguments tenant, session id, after, before, limit."""
    return _PAGE_ASC if order is Order.asc else _PAGE_DESC


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _load(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _raw_content(content: str) -> bytes | None:
    """Content that a text column cannot hold, as bytes; None when it can."""
    if _NOT_TEXT.search(content) is None:
        return None
    return content.encode("utf-8", "surrogatepass")


def _session_from(row: asyncpg.Record) -> Session:
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
        }
    )


def _message_from(row: asyncpg.Record) -> Message:
    return Message(
        seq=row["seq"],
        role=Role(row["role"]),
        content=row["content"] if row["content"] is not None else row["content_raw"].decode("utf-8", "surrogatepass"),
        created_at=row["created_at"],
        metadata=_load(row["metadata"]),
        references=_load(row["refs"]),
    )


def _session_values(session: Session) -> tuple[Any, ...]:
    """The columns of `sessions` after (tenant, id), in `_INSERT_SESSION` order."""
    return (
        session.user_id,
        session.document_id,
        session.section_id,
        session.title,
        _dump(session.settings.model_dump(mode="json")),
        _dump(session.metadata),
        session.message_count,
        session.last_seq,
        session.version,
        session.created_at,
        session.updated_at,
    )


def _change_time(current: Session) -> datetime:
    # Replicas' clocks may disagree a little; a session's updated_at never moves back.
    return max(utcnow(), current.updated_at)


def _migration_lock_key(schema: str) -> int:
    digest = hashlib.blake2b(f"chatsessions.migrate:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _application_name(schema: str) -> str:
    return f"chatsessions:{schema}"[:63]  # PostgreSQL keeps 63 bytes of it


async def migrate(dsn: str, *, schema: str, connect_timeout: float) -> list[int]:
    """Create `schema` and apply every step of `MIGRATIONS` it lacks.

    Runs under a PostgreSQL advisory lock keyed by the schema, so of many
    replicas starting at once one migrates and the others wait, then find
    nothing left to do. Each step commits together with its row in
    `schema_migrations`.

    Returns:
        The versions this call applied (empty when the schema was current).
    """
    conn = await asyncpg.connect(
        dsn,
        timeout=connect_timeout,
        # Building an index on a large table may take minutes: no statement timeout here.
        command_timeout=None,
        server_settings={"application_name": _application_name(schema)},
    )
    try:
        key = _migration_lock_key(schema)
        # Waits for a replica that is migrating; its lock dies with its connection if it crashes.
        await conn.execute("SELECT pg_advisory_lock($1)", key)
        # Look first: a role may own its schema without the right to create schemas.
        if not await conn.fetchval("SELECT true FROM pg_namespace WHERE nspname = $1", schema):
            await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute("SELECT set_config('search_path', $1, false)", f'"{schema}"')
        await conn.execute(_MIGRATIONS_TABLE)
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        applied: list[int] = []
        for step in MIGRATIONS:
            if step.version in done:
                continue
            async with conn.transaction():
                await conn.execute(step.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", step.version, step.name
                )
            log.info("PostgreSQL schema %s: applied migration %d (%s)", schema, step.version, step.name)
            applied.append(step.version)
        newest = max(done, default=0)
        if newest > MIGRATIONS[-1].version:
            log.warning(
                "PostgreSQL schema %s is at version %d, newer than this release knows (%d)",
                schema,
                newest,
                MIGRATIONS[-1].version,
            )
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
        return applied
    finally:
        await conn.close()


async def _keep_session_state(_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset hook: skip asyncpg's default reset query on every release.

    We hold no session-level state (no SET, LISTEN, cursors or advisory locks
    on pooled connections), and asyncpg still rolls back an open transaction.
    """


class PostgresSessionRepository:
    """Sessions in PostgreSQL; any number of replicas may share one schema."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        timeout: float,
        idempotency_ttl: float,
        idempotency_lease: float = IDEMPOTENCY_LEASE_SECONDS,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._idempotency_ttl = idempotency_ttl
        self._idempotency_lease = idempotency_lease
        self._next_purge = 0.0  # time.monotonic() after which expired keys are deleted

    @classmethod
    async def open(cls, settings: Settings) -> PostgresSessionRepository:
        """Migrate the schema, then open the connection pool.

        Raises:
            StorageUnavailable: no DSN is configured, or PostgreSQL cannot be reached.
        """
        dsn = settings.postgres_dsn
        if not dsn:
            raise StorageUnavailable("the postgres store needs CHATSESSIONS_POSTGRES_DSN")
        schema = settings.postgres_schema
        timeout = settings.postgres_timeout_seconds
        with _translate_errors():
            await migrate(dsn, schema=schema, connect_timeout=timeout)
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min(settings.postgres_pool_min, settings.postgres_pool_max),
                max_size=settings.postgres_pool_max,
                timeout=timeout,
                command_timeout=timeout,
                reset=_keep_session_state,
                server_settings={"search_path": f'"{schema}"', "application_name": _application_name(schema)},
            )
        return cls(pool, timeout=timeout, idempotency_ttl=settings.idempotency_ttl_seconds)

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        with _translate_errors():
            async with self._pool.acquire(timeout=self._timeout) as conn:
                yield conn

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Conn]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    async def _lock(self, conn: Conn, tenant: str, session_id: str, if_match: Precondition | None) -> Session:
        """Lock the session row for this transaction; check `If-Match` against the locked version."""
        row = await conn.fetchrow(_LOCK_SESSION, tenant, session_id)
        if row is None:
            raise SessionNotFound(session_id)
        session = _session_from(row)
        if if_match is not None and not if_match.holds(session.version):
            raise PreconditionFailed(session_id, session.version)
        return session

    async def _keep_answer(
        self,
        conn: Conn,
        *,
        tenant: str,
        idempotency: IdempotencyRequest | None,
        session: Session,
        messages: list[Message],
    ) -> None:
        if idempotency is not None:
            answer = idempotency.render(session, messages)
            await self._store_answer(
                conn, tenant=tenant, key=idempotency.key, fingerprint=idempotency.fingerprint, answer=answer
            )

    async def _store_answer(
        self, conn: Conn, *, tenant: str, key: str, fingerprint: str, answer: StoredResponse
    ) -> None:
        await conn.execute(
            _STORE_ANSWER,
            tenant,
            key,
            fingerprint,
            answer.status,
            answer.body,
            _dump(answer.headers),
            self._idempotency_ttl,
        )

    async def _update_counters(self, conn: Conn, tenant: str, session: Session) -> None:
        await conn.execute(
            _UPDATE_COUNTERS,
            tenant,
            session.id,
            session.message_count,
            session.last_seq,
            session.version,
            session.updated_at,
        )

    # --- sessions -----------------------------------------------------------

    async def create_session(
        self, tenant: str, data: SessionCreate, *, idempotency: IdempotencyRequest | None = None
    ) -> Session:
        session = new_session(data, now=utcnow())
        async with self._transaction() as conn:
            if await conn.fetchval(_INSERT_SESSION, tenant, session.id, *_session_values(session)) is None:
                raise SessionExists(session.id)
            await self._keep_answer(conn, tenant=tenant, idempotency=idempotency, session=session, messages=[])
        return session

    async def get_or_create_session(self, tenant: str, session_id: str, data: SessionCreate) -> tuple[Session, bool]:
        session = new_session(data, session_id=session_id, now=utcnow())
        # INSERT ... ON CONFLICT decides the race in the database; the loser reads the
        # winner's row. Should that row be deleted in between, try again.
        for _ in range(5):
            async with self._connection() as conn:
                if await conn.fetchval(_INSERT_SESSION, tenant, session_id, *_session_values(session)):
                    return session, True
                row = await conn.fetchrow(_SELECT_SESSION, tenant, session_id)
            if row is not None:
                return _session_from(row), False
        raise StorageUnavailable(f"session {session_id!r} is being created and deleted too fast; retry")

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(_SELECT_SESSION, tenant, session_id)
        return _session_from(row) if row is not None else None

    async def list_sessions(
        self, tenant: str, *, filters: SessionFilter, limit: int, cursor: SessionCursor | None
    ) -> SessionListing:
        sql, args = listing_query(tenant, filters=filters, limit=limit + 1, cursor=cursor)
        async with self._connection() as conn:
            rows = await conn.fetch(sql, *args)
        page = [_session_from(row) for row in rows[:limit]]
        more = len(rows) > limit
        return SessionListing(page, SessionCursor(page[-1].updated_at, page[-1].id) if more and page else None)

    async def patch_session(
        self, tenant: str, session_id: str, patch: SessionPatch, *, if_match: Precondition | None = None
    ) -> Session:
        async with self._transaction() as conn:
            current = await self._lock(conn, tenant, session_id, if_match)
            session = apply_session_patch(
                current, patch.model_dump(mode="json", exclude_unset=True), now=_change_time(current)
            )
            await conn.execute(
                _UPDATE_SESSION,
                tenant,
                session_id,
                session.user_id,
                session.document_id,
                session.section_id,
                session.title,
                _dump(session.settings.model_dump(mode="json")),
                _dump(session.metadata),
                session.version,
                session.updated_at,
            )
        return session

    async def delete_session(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> None:
        # Messages go with the row: ON DELETE CASCADE.
        if if_match is None:
            async with self._connection() as conn:
                deleted = await conn.fetchval(
                    "DELETE FROM sessions WHERE tenant = $1 AND id = $2 RETURNING true", tenant, session_id
                )
            if deleted is None:
                raise SessionNotFound(session_id)
            return
        async with self._transaction() as conn:
            await self._lock(conn, tenant, session_id, if_match)
            await conn.execute("DELETE FROM sessions WHERE tenant = $1 AND id = $2", tenant, session_id)

    # --- messages -----------------------------------------------------------

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageCreate],
        *,
        if_match: Precondition | None = None,
        idempotency: IdempotencyRequest | None = None,
    ) -> tuple[Session, list[Message]]:
        async with self._transaction() as conn:
            # The row lock serialises appends to this session across every replica.
            current = await self._lock(conn, tenant, session_id, if_match)
            now = _change_time(current)
            added = new_messages(messages, first_seq=current.last_seq + 1, now=now)
            raw = [_raw_content(m.content) for m in added]
            await conn.execute(
                _INSERT_MESSAGES,
                tenant,
                session_id,
                now,
                [m.seq for m in added],
                [m.role.value for m in added],
                [m.content if r is None else None for m, r in zip(added, raw, strict=True)],
                raw,
                [_dump(m.metadata) for m in added],
                [_dump(m.references) for m in added],
            )
            session = after_append(current, len(added), now=now)
            await self._update_counters(conn, tenant, session)
            await self._keep_answer(conn, tenant=tenant, idempotency=idempotency, session=session, messages=added)
        return session, added

    async def list_messages(self, tenant: str, session_id: str, query: MessageQuery) -> tuple[list[Message], bool]:
        after = 0 if query.after is None else min(max(query.after, 0), _MAX_SEQ)
        before = _MAX_SEQ if query.before is None else min(max(query.before, 0), _MAX_SEQ)
        sql = page_query(query.order)
        async with self._connection() as conn:
            rows = await conn.fetch(sql, tenant, session_id, after, before, query.limit + 1)
        if not rows:
            raise SessionNotFound(session_id)
        found = [_message_from(row) for row in rows if row["seq"] is not None]
        return found[: query.limit], len(found) > query.limit

    async def get_message(self, tenant: str, session_id: str, seq: int) -> Message:
        # Out of bigint range: no such message, but the query still tells whether the session exists.
        wanted = seq if 0 < seq <= _MAX_SEQ else 0
        async with self._connection() as conn:
            row = await conn.fetchrow(_GET_MESSAGE, tenant, session_id, wanted)
        if row is None:
            raise SessionNotFound(session_id)
        if row["seq"] is None:
            raise MessageNotFound(session_id, seq)
        return _message_from(row)

    async def clear_messages(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> Session:
        async with self._transaction() as conn:
            current = await self._lock(conn, tenant, session_id, if_match)
            await conn.execute("DELETE FROM messages WHERE tenant = $1 AND session_id = $2", tenant, session_id)
            session = after_clear(current, now=_change_time(current))
            await self._update_counters(conn, tenant, session)
        return session

    # --- idempotency ----------------------------------------------------------

    async def idempotency_begin(self, tenant: str, key: str, fingerprint: str) -> StoredResponse | None:
        async with self._connection() as conn:
            if time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + IDEMPOTENCY_PURGE_INTERVAL
                await conn.execute(_PURGE_KEYS)
            # Claim the key, or read what holds it. A holder may finish (and release)
            # between the two statements; then claim again.
            for _ in range(5):
                if await conn.fetchval(_CLAIM_KEY, tenant, key, fingerprint, self._idempotency_lease):
                    return None
                row = await conn.fetchrow(_READ_KEY, tenant, key)
                if row is None:
                    continue
                if row["fingerprint"] != fingerprint:
                    raise IdempotencyKeyReused()
                if row["status"] is None:
                    raise IdempotencyInProgress()
                return StoredResponse(row["status"], bytes(row["body"]), dict(json.loads(row["headers"])))
        raise IdempotencyInProgress()

    async def idempotency_finish(self, tenant: str, key: str, response: StoredResponse | None) -> None:
        async with self._connection() as conn:
            if response is None:
                await conn.execute(_RELEASE_KEY, tenant, key)
            else:
                await self._store_answer(conn, tenant=tenant, key=key, fingerprint="", answer=response)

    # --- lifecycle --------------------------------------------------------------

    async def check_ready(self) -> None:
        async with self._connection() as conn:
            writable = await conn.fetchval("SELECT NOT pg_is_in_recovery()")
        if not writable:
            raise StorageUnavailable("PostgreSQL is a read-only standby")

    async def aclose(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), timeout=self._timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._pool.terminate()
