"""`PostgresSessionRepository`: the `SessionRepository` contract on PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from chatsessions import events as ev
from chatsessions import streaming
from chatsessions.config import Settings
from chatsessions.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    MessageNotFound,
    MessageNotInProgress,
    SessionExists,
    SessionNotFound,
    StorageUnavailable,
)
from chatsessions.models import (
    Citation,
    CitationCursor,
    CitationFilter,
    CitationListing,
    ExportFilter,
    IdempotencyRequest,
    ImportOutcome,
    Message,
    MessageCreate,
    MessageQuery,
    MessageStatus,
    Precondition,
    Retention,
    Role,
    SearchFilter,
    SearchHit,
    SearchResult,
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
from chatsessions.storage import common
from chatsessions.storage.base import NullObserver, StoreObserver
from chatsessions.storage.postgres import queries as q
from chatsessions.storage.postgres import rows
from chatsessions.storage.postgres.events import (
    EventFollower,
    forget_session_events,
    read_session_events,
    read_tenant_events,
    record_events,
)
from chatsessions.storage.postgres.faults import translate_errors
from chatsessions.storage.postgres.schema import application_name, migrate
from chatsessions.storage.postgres.writer import (
    ALONE,
    MESSAGE_WEIGHT,
    GroupCommit,
    PendingAppend,
    PendingCreate,
    RunAlone,
    created_event,
    run_appends,
    run_creates,
)
from chatsessions.text import SearchQuery, content_text, snippet, tsquery_literal

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger("chatsessions.postgres")

# A claimed Idempotency-Key whose request has not finished by then is free again:
# the replica that held it crashed. Far longer than any statement may run.
IDEMPOTENCY_LEASE_SECONDS = 60.0
# Expired Idempotency-Keys are deleted by the first claim after this many seconds.
IDEMPOTENCY_PURGE_INTERVAL = 60.0
# A change that lost a race inside its own statement (the row changed or went between the
# statement's snapshot and its row lock) runs again; the next snapshot sees the winner.
RACE_ATTEMPTS = 5
# Expired sessions one purge statement deletes at most (their messages go by cascade).
PURGE_BATCH = 100
log = logging.getLogger("chatsessions.postgres")


async def _keep_session_state(_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Pool reset hook: skip asyncpg's default reset query on every release.

    We hold no session-level state (no SET, LISTEN, cursors or advisory locks
    on pooled connections), and asyncpg still rolls back an open transaction.
    """


def _versions(if_match: Precondition | None) -> list[int] | None:
    """An `If-Match` as the `$n::bigint[]` argument of a guarded statement (None: any version)."""
    if if_match is None or if_match.any:
        return None
    return sorted(if_match.versions)


def _expected(if_match: Precondition | None) -> tuple[bool, int | None]:
    """Whether an append with this `If-Match` can join a batch, and the version it demands (None: any)."""
    if if_match is None or if_match.any:
        return True, None
    if len(if_match.versions) == 1:
        return True, next(iter(if_match.versions))
    return False, None


def _deleted_event(tenant: str, session_id: str, row: asyncpg.Record) -> ev.EventDraft:
    """session.deleted from `queries.DELETE_SESSION`'s row (the deleted version and links)."""
    data = json.dumps({"session_id": session_id, "version": row["version"] + 1}, separators=(",", ":"))
    return ev.EventDraft(
        tenant,
        session_id,
        row["version"] + 1,
        ev.SESSION_DELETED,
        data,
        row["user_id"],
        row["document_id"],
        row["section_id"],
    )


def _lost_race(session_id: str) -> StorageUnavailable:
    return StorageUnavailable(f"session {session_id!r} is changing too fast; retry")


class PostgresSessionRepository:
    """Sessions in PostgreSQL; any number of replicas may share one schema."""

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        timeout: float,
        idempotency_ttl: float,
        idempotency_lease: float = IDEMPOTENCY_LEASE_SECONDS,
        observer: StoreObserver | None = None,
        max_page_bytes: int = 8 * 2**20,
        max_content_bytes: int = 2**20,
        stream_idle: float = 300.0,
        retention: Retention | None = None,
        purge_interval: float = 60.0,
    ) -> None:
        self._pool = pool
        self._retention = retention or Retention()
        self._purge_interval = purge_interval
        self._sweeper: asyncio.Task[None] | None = None
        self._max_page_bytes = max_page_bytes
        self._timeout = timeout
        self._idempotency_ttl = idempotency_ttl
        self._idempotency_lease = idempotency_lease
        self._observer: StoreObserver = observer if observer is not None else NullObserver()
        self._next_purge = 0.0  # time.monotonic() after which expired keys are deleted
        self._appends = GroupCommit(
            run_appends, connection=self._connection, observer=self._observer, name="chatsessions-appends"
        )
        self._creates = GroupCommit(
            run_creates, connection=self._connection, observer=self._observer, name="chatsessions-creates"
        )
        self._follower: EventFollower | None = None
        self._max_content_bytes = max_content_bytes
        self._stream_idle = stream_idle
        self._stream_expiry: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, settings: Settings, *, observer: StoreObserver | None = None, sink: ev.EventSink | None = None
    ) -> PostgresSessionRepository:
        """Migrate the schema, then open the connection pool.

        Args:
            settings: `postgres_dsn`, `postgres_schema`, pool bounds and timeout are used.
            observer: told of every write transaction (`commit`, with the number of changes it
                held) and of the group-commit queues' depth (`queue_depth`).
            sink: receives every change event any replica commits, in id order
                (`events.EventFollower`); None: events are recorded, not followed.

        Raises:
            StorageUnavailable: no DSN is configured, or PostgreSQL cannot be reached.
        """
        dsn = settings.postgres_dsn
        if not dsn:
            raise StorageUnavailable("the postgres store needs CHATSESSIONS_POSTGRES_DSN")
        schema = settings.postgres_schema
        timeout = settings.postgres_timeout_seconds
        idle = settings.retention_idle_seconds
        server_settings = {
            "search_path": f'"{schema}"',
            "application_name": application_name(schema),
            # Every query's "not expired" condition reads the idle rule from here.
            q.IDLE_SETTING: "" if idle is None else repr(float(idle)),
            # Our statements are short index lookups: JIT only slows them, and asyncpg's type
            # introspection query on a large catalog took over the statement timeout with it.
            "jit": "off",
        }
        with translate_errors():
            await migrate(dsn, schema=schema, connect_timeout=timeout)
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min(settings.postgres_pool_min, settings.postgres_pool_max),
                max_size=settings.postgres_pool_max,
                timeout=timeout,
                command_timeout=timeout,
                reset=_keep_session_state,
                server_settings=server_settings,
            )
        repository = cls(
            pool,
            timeout=timeout,
            idempotency_ttl=settings.idempotency_ttl_seconds,
            observer=observer,
            max_page_bytes=settings.max_page_bytes,
            retention=Retention(idle),
            purge_interval=settings.purge_interval_seconds,
            max_content_bytes=settings.max_content_bytes,
            stream_idle=settings.stream_idle_seconds,
        )
        repository._sweeper = asyncio.create_task(repository._sweep(), name="chatsessions-postgres-sweeper")
        repository._stream_expiry = asyncio.create_task(repository._expire_streams(), name="chatsessions-stream-expiry")
        if sink is not None:
            follower = EventFollower(
                dsn=dsn,
                schema=schema,
                connection=repository._connection,
                sink=sink,
                server_settings=server_settings,
                retention_seconds=settings.events_retention_seconds,
            )
            try:
                with translate_errors():
                    await follower.start()
            except BaseException:
                await repository.aclose()
                raise
            repository._follower = follower
        return repository

    # --- connections ----------------------------------------------------------

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Conn]:
        with translate_errors():
            async with self._pool.acquire(timeout=self._timeout) as conn:
                yield conn

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[Conn]:
        """A connection for one write transaction (a single statement is one), reported to the observer."""
        async with self._connection() as conn:
            started = time.perf_counter()
            try:
                yield conn
            finally:
                self._observer.commit(changes=1, seconds=time.perf_counter() - started)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Conn]:
        async with self._writing() as conn, conn.transaction():
            yield conn

    async def _lock(self, conn: Conn, tenant: str, session_id: str, if_match: Precondition | None) -> Session:
        """Lock the session row for this transaction; check `If-Match` against the locked version."""
        row = await conn.fetchrow(q.LOCK_SESSION, tenant, session_id)
        if row is None:
            raise SessionNotFound(session_id)
        session = rows.session_from(row)
        common.check_precondition(session_id, session.version, if_match)
        return session

    async def _store_answer(
        self,
        conn: Conn,
        *,
        tenant: str,
        key: str,
        fingerprint: str,
        answer: StoredResponse,
        session_id: str | None = None,
    ) -> None:
        await conn.execute(
            q.STORE_ANSWER,
            tenant,
            key,
            fingerprint,
            answer.status,
            answer.body,
            rows.dump(answer.headers),
            self._idempotency_ttl,
            session_id,
        )

    async def _free_if_expired(self, tenant: str, session_id: str) -> bool:
        """Delete the session if it exists but has expired (its id is free again); whether it did."""
        async with self._writing() as conn:
            return bool(await conn.fetchval(q.DELETE_IF_EXPIRED, tenant, session_id))

    # --- sessions -----------------------------------------------------------

    async def create_session(
        self, tenant: str, data: SessionCreate, *, idempotency: IdempotencyRequest | None = None
    ) -> Session:
        session = common.new_session(data, now=utcnow())
        values = rows.session_values(session)
        for _ in range(2):  # a second time only after freeing the id of an expired session
            if idempotency is None:
                created, _ = await self._create(tenant, session.id, values)
            else:  # the answer commits with the session, in the same statement
                answer = idempotency.render(session, [])
                async with self._transaction() as conn:
                    created = await conn.fetchval(
                        q.INSERT_SESSION_ANSWERED,
                        tenant,
                        session.id,
                        *values,
                        idempotency.key,
                        idempotency.fingerprint,
                        answer.status,
                        answer.body,
                        rows.dump(answer.headers),
                        self._idempotency_ttl,
                    )
                    if created:
                        await record_events(conn, [ev.session_event(tenant, session, ev.SESSION_CREATED)])
            if created:
                return session
            if not await self._free_if_expired(tenant, session.id):
                break
        raise SessionExists(session.id)

    async def get_or_create_session(self, tenant: str, session_id: str, data: SessionCreate) -> tuple[Session, bool]:
        session = common.new_session(data, session_id=session_id, now=utcnow())
        values = rows.session_values(session)
        # INSERT ... ON CONFLICT decides the race in the database; the loser reads the winner's
        # row. When that row is newer than the statement's snapshot (or went again), try again.
        for _ in range(RACE_ATTEMPTS):
            created, row = await self._create(tenant, session_id, values)
            if created:
                return session, True
            if row is not None:
                existing = rows.session_from(row)
                if not self._retention.expired(existing, utcnow()):
                    return existing, False
                await self._free_if_expired(tenant, session_id)
        raise StorageUnavailable(f"session {session_id!r} is being created and deleted too fast; retry")

    async def _create(
        self, tenant: str, session_id: str, values: tuple[Any, ...]
    ) -> tuple[bool, asyncpg.Record | None]:
        """Insert a session unless the id exists: whether it did, else the existing row if visible."""
        outcome: asyncpg.Record | RunAlone | None = ALONE
        if rows.storable(values):
            weight = sum(len(v) for v in values if isinstance(v, str))
            outcome = await self._creates.submit(
                PendingCreate(tenant=tenant, session_id=session_id, weight=weight, values=values)
            )
        if isinstance(outcome, RunAlone):
            async with self._transaction() as conn:
                outcome = await conn.fetchrow(q.GET_OR_INSERT_SESSION, tenant, session_id, *values)
                if outcome is not None and outcome["created"]:
                    await record_events(conn, [created_event(tenant, outcome)])
        if outcome is None:
            return False, None
        return bool(outcome["created"]), None if outcome["created"] else outcome

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(q.SELECT_SESSION, tenant, session_id)
        return rows.session_from(row) if row is not None else None

    async def list_sessions(
        self, tenant: str, *, filters: SessionFilter, limit: int, cursor: SessionCursor | None
    ) -> SessionListing:
        sql, args = q.listing_query(tenant, filters=filters, limit=limit + 1, cursor=cursor)
        async with self._connection() as conn:
            found = await conn.fetch(sql, *args)
        return common.listing_page([rows.session_from(row) for row in found], limit)

    async def patch_session(
        self, tenant: str, session_id: str, patch: SessionPatch, *, if_match: Precondition | None = None
    ) -> Session:
        async with self._transaction() as conn:
            current = await self._lock(conn, tenant, session_id, if_match)
            changes = patch.model_dump(mode="json", exclude_unset=True)
            session = apply_session_patch(current, changes, now=common.change_time(current))
            await conn.execute(
                q.UPDATE_SESSION,
                tenant,
                session_id,
                *rows.session_links(session),
                session.version,
                session.updated_at,
            )
            await record_events(conn, [ev.session_event(tenant, session, ev.SESSION_UPDATED)])
        return session

    async def delete_session(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> None:
        # Messages go with the row: ON DELETE CASCADE.
        versions = _versions(if_match)
        for _ in range(RACE_ATTEMPTS):
            async with self._transaction() as conn:
                row = await conn.fetchrow(q.DELETE_SESSION, tenant, session_id, versions)
                if row is not None and row["found"]:
                    await forget_session_events(conn, tenant, session_id)
                    await record_events(conn, [_deleted_event(tenant, session_id, row)])
            if row is None:
                raise SessionNotFound(session_id)
            if row["found"]:
                return
            common.check_precondition(session_id, row["version"], if_match)
        raise _lost_race(session_id)

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
        arrays = rows.message_arrays(tenant, messages)
        batchable, expected = _expected(if_match)
        # Citations go in by a second statement (they reference their messages): not batched.
        cites = any(common.cited_doc_ids(m.references) for m in messages)
        ids = common.message_ids(messages)
        if ids:  # the ids are checked under the session's row lock, so no racing append takes one first
            return await self._append_locked(tenant, session_id, messages, ids, arrays, if_match, idempotency)
        alone = idempotency is not None or cites
        texts = [
            value
            for name, column in zip(q.MESSAGE_FIELDS, arrays, strict=True)
            if name[1] != "bytea"
            for value in column
        ]
        if not alone and batchable and rows.storable(texts):
            weight = sum(len(content_text(m.content)) + MESSAGE_WEIGHT for m in messages)
            pending = PendingAppend(
                tenant=tenant,
                session_id=session_id,
                weight=weight,
                count=len(messages),
                expected=expected,
                arrays=arrays,
                messages=messages,
            )
            outcome = await self._appends.submit(pending)
            if not isinstance(outcome, RunAlone):
                result = self._appended(session_id, outcome, messages, if_match)
                if result is not None:
                    return result
        # By itself: under an Idempotency-Key, with an If-Match of several versions, or after a lost race.
        args = (len(messages), utcnow(), _versions(if_match), *arrays)
        for _ in range(RACE_ATTEMPTS):
            if not alone:
                async with self._transaction() as conn:
                    row = await conn.fetchrow(q.APPEND, tenant, session_id, *args)
                    result = self._appended(session_id, row, messages, if_match)
                    if result is not None:
                        await record_events(conn, [ev.messages_event(tenant, *result)])
            else:
                # Citations and the answer under a key are made from the result, so they take
                # more statements; the transaction commits them with the change.
                async with self._transaction() as conn:
                    row = await conn.fetchrow(q.APPEND, tenant, session_id, *args)
                    result = self._appended(session_id, row, messages, if_match)
                    if result is not None:
                        await self._after_append(conn, tenant, session_id, result, cites, idempotency)
            if result is not None:
                return result
        raise _lost_race(session_id)

    async def _append_locked(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageCreate],
        ids: list[str],
        arrays: tuple[list[Any], ...],
        if_match: Precondition | None,
        idempotency: IdempotencyRequest | None,
    ) -> tuple[Session, list[Message]]:
        """An append carrying client message ids: lock the session, check the ids, append, in one transaction."""
        async with self._transaction() as conn:
            await self._lock(conn, tenant, session_id, if_match)
            found = await conn.fetch(q.FIND_CLIENT_IDS, tenant, session_id, ids)
            common.check_message_ids(session_id, messages, {row["client_id"]: row["seq"] for row in found})
            row = await conn.fetchrow(q.APPEND, tenant, session_id, len(messages), utcnow(), None, *arrays)
            result = self._appended(session_id, row, messages, if_match)
            if result is None:  # cannot happen: this transaction holds the row's lock
                raise _lost_race(session_id)
            cites = any(common.cited_doc_ids(m.references) for m in messages)
            await self._after_append(conn, tenant, session_id, result, cites, idempotency)
            return result

    async def _after_append(
        self,
        conn: Conn,
        tenant: str,
        session_id: str,
        result: tuple[Session, list[Message]],
        cites: bool,
        idempotency: IdempotencyRequest | None,
    ) -> None:
        """In the append's transaction: its citations, its answer under an Idempotency-Key, its event (last)."""
        session, added = result
        if cites:
            citations = rows.citation_arrays(added)
            await conn.execute(q.INSERT_CITATIONS, tenant, session_id, session.updated_at, *citations)
        if idempotency is not None:
            await self._store_answer(
                conn,
                tenant=tenant,
                key=idempotency.key,
                fingerprint=idempotency.fingerprint,
                answer=idempotency.render(*result),
                session_id=session_id,
            )
        await record_events(conn, [ev.messages_event(tenant, session, added)])

    @staticmethod
    def _appended(
        session_id: str, row: asyncpg.Record | None, messages: list[MessageCreate], if_match: Precondition | None
    ) -> tuple[Session, list[Message]] | None:
        """The outcome of `queries.APPEND`; None when it lost a race and must run again."""
        if row is None:
            raise SessionNotFound(session_id)
        if not row["found"]:
            common.check_precondition(session_id, row["version"], if_match)
            return None
        session = rows.session_from(row)
        first_seq = session.last_seq - len(messages) + 1
        return session, common.new_messages(messages, first_seq=first_seq, now=session.updated_at)

    async def list_messages(self, tenant: str, session_id: str, query: MessageQuery) -> tuple[list[Message], bool]:
        after, before = common.seq_bounds(query)
        async with self._connection() as conn:
            found = await conn.fetch(
                q.page_query(query.order), tenant, session_id, after, before, query.limit + 1, self._max_page_bytes
            )
        if not found:
            raise SessionNotFound(session_id)
        present = [row for row in found if row["seq"] is not None]
        page = [rows.message_from(row) for row in present if row["kept"]]
        return page[: query.limit], len(present) > min(len(page), query.limit)

    async def get_message(self, tenant: str, session_id: str, seq: int) -> Message:
        # Out of bigint range: no such message, but the query still tells whether the session exists.
        wanted = seq if 0 < seq <= common.MAX_SEQ else 0
        async with self._connection() as conn:
            row = await conn.fetchrow(q.GET_MESSAGE, tenant, session_id, wanted)
        if row is None:
            raise SessionNotFound(session_id)
        if row["seq"] is None:
            raise MessageNotFound(session_id, seq)
        return rows.message_from(row)

    async def clear_messages(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> Session:
        async with self._transaction() as conn:
            current = await self._lock(conn, tenant, session_id, if_match)
            await conn.execute(q.CLEAR_MESSAGES, tenant, session_id)
            await conn.execute(q.DELETE_ANSWERS, tenant, session_id)
            session = common.after_clear(current, now=common.change_time(current))
            await conn.execute(q.CLEAR_COUNTERS, tenant, session_id, session.version, session.updated_at)
            await forget_session_events(conn, tenant, session_id)
            await record_events(conn, [ev.session_event(tenant, session, ev.SESSION_CLEARED)])
        return session

    async def delete_message(
        self, tenant: str, session_id: str, seq: int, *, if_match: Precondition | None = None
    ) -> Session:
        async with self._transaction() as conn:
            current = await self._lock(conn, tenant, session_id, if_match)
            wanted = seq if 0 < seq <= common.MAX_SEQ else 0
            if await conn.fetchval(q.DELETE_MESSAGE, tenant, session_id, wanted) is None:
                raise MessageNotFound(session_id, seq)
            session = common.after_message_deleted(current, now=common.change_time(current))
            await conn.execute(q.MESSAGE_DELETED_COUNTERS, tenant, session_id, session.version, session.updated_at)
            await conn.execute(q.DELETE_ANSWERS, tenant, session_id)
            await record_events(conn, [ev.message_deleted_event(tenant, session, seq)])
        return session

    async def delete_sessions(self, tenant: str, *, user_id: str, document_id: str | None = None) -> int:
        async with self._writing() as conn:
            deleted: int = await conn.fetchval(q.DELETE_USER_SESSIONS, tenant, user_id, document_id)
        return deleted

    # --- export, import, purge -------------------------------------------------------

    async def export_sessions(
        self, tenant: str, *, filters: ExportFilter, after: str | None, limit: int
    ) -> list[Session]:
        async with self._connection() as conn:
            found = await conn.fetch(
                q.EXPORT_SESSIONS, tenant, after or "", limit, filters.user_id, filters.document_id, filters.session_id
            )
        return [rows.session_from(row) for row in found]

    async def import_session(
        self, tenant: str, session: Session, messages: list[Message], *, replace: bool
    ) -> ImportOutcome:
        outcome = ImportOutcome.created
        async with self._transaction() as conn:
            row = await conn.fetchrow(q.LOCK_ANY_SESSION, tenant, session.id)
            if row is not None:
                if not self._retention.expired(rows.session_from(row), utcnow()):
                    if not replace:
                        return ImportOutcome.skipped
                    outcome = ImportOutcome.replaced
                # Like a delete followed by an import: messages and citations go by cascade.
                await conn.execute(q.DELETE_ANSWERS, tenant, session.id)
                await conn.execute(q.DELETE_ANY_SESSION, tenant, session.id)
            await conn.execute(q.INSERT_SESSION, tenant, session.id, *rows.session_values(session))
            if messages:
                await conn.execute(q.IMPORT_MESSAGES, tenant, session.id, *rows.imported_arrays(tenant, messages))
                await conn.execute(q.IMPORT_CITATIONS, tenant, session.id, *rows.imported_citations(messages))
        return outcome

    async def purge(self) -> int:
        """Delete expired sessions in batches (rows another replica holds are skipped) and expired keys.

        PostgreSQL erases by DELETE: the rows are gone from every query at once; VACUUM
        reclaims their space later.
        """
        purged = 0
        for statement in (q.PURGE_BY_TIME, q.PURGE_BY_IDLE):
            while True:
                async with self._writing() as conn:
                    count: int = await conn.fetchval(statement, PURGE_BATCH)
                purged += count
                if count < PURGE_BATCH:
                    break
        async with self._writing() as conn:
            await conn.execute(q.PURGE_KEYS)
        return purged

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._purge_interval)
            try:
                await self.purge()
            except Exception:
                log.warning("the purge of expired sessions failed; will retry", exc_info=True)

    # --- search and citations ----------------------------------------------------

    async def search(
        self, tenant: str, query: SearchQuery, *, filters: SearchFilter, limit: int, offset: int
    ) -> SearchResult:
        tsquery = tsquery_literal(tenant, filters.role.value if filters.role else None, query)
        # The scoped words already keep to the tenant; the column check makes it exact.
        args: list[Any] = [tsquery, limit + 1, offset, tenant]
        on_session = common.equalities(
            args,
            lambda n: f"${n}",
            "s.{}".format,
            user_id=filters.user_id,
            document_id=filters.document_id,
            section_id=filters.section_id,
        )
        clauses = "".join(f" AND {c}" for c in ["m.tenant = $4", *on_session])
        sql = q.SEARCH.format(join=q.SEARCH_JOIN, filters=clauses + q.SESSION_ALIVE)
        async with self._connection() as conn:
            found = await conn.fetch(sql, *args)
        hits = [
            SearchHit(
                session_id=row["session_id"],
                seq=row["seq"],
                role=Role(row["role"]),
                created_at=row["created_at"],
                snippet=snippet(content_text(rows.content_of(row)), query),
            )
            for row in found
        ]
        return SearchResult(hits[:limit], offset + limit if len(hits) > limit else None)

    async def list_citations(
        self, tenant: str, doc_id: str, *, filters: CitationFilter, limit: int, cursor: CitationCursor | None
    ) -> CitationListing:
        sql, args = common.citations_sql(
            tenant=tenant,
            doc_id=doc_id,
            filters=filters,
            limit=limit + 1,
            cursor=cursor,
            placeholder=lambda n: f"${n}",
            moment=rows.moment,
            alive=(q.SESSION_ALIVE.removeprefix(" AND "), []),
        )
        async with self._connection() as conn:
            found = await conn.fetch(sql, *args)
        return common.citation_listing(
            [
                (
                    Citation(
                        session_id=row["session_id"],
                        seq=row["seq"],
                        created_at=row["created_at"],
                        reference=json.loads(row["reference"]),
                    ),
                    row["ordinal"],
                )
                for row in found
            ],
            limit,
        )

    # --- idempotency ----------------------------------------------------------

    async def idempotency_begin(self, tenant: str, key: str, fingerprint: str) -> StoredResponse | None:
        async with self._writing() as conn:
            if time.monotonic() >= self._next_purge:
                self._next_purge = time.monotonic() + IDEMPOTENCY_PURGE_INTERVAL
                await conn.execute(q.PURGE_KEYS)
            # Claim the key, or read what holds it. A holder may finish (and release)
            # between the two statements; then claim again.
            for _ in range(RACE_ATTEMPTS):
                if await conn.fetchval(q.CLAIM_KEY, tenant, key, fingerprint, self._idempotency_lease):
                    return None
                row = await conn.fetchrow(q.READ_KEY, tenant, key)
                if row is None:
                    continue
                if row["fingerprint"] != fingerprint:
                    raise IdempotencyKeyReused()
                if row["status"] is None:
                    raise IdempotencyInProgress()
                return StoredResponse(row["status"], bytes(row["body"]), dict(json.loads(row["headers"])))
        raise IdempotencyInProgress()

    async def idempotency_finish(self, tenant: str, key: str, response: StoredResponse | None) -> None:
        async with self._writing() as conn:
            if response is None:
                await conn.execute(q.RELEASE_KEY, tenant, key)
            else:
                await self._store_answer(conn, tenant=tenant, key=key, fingerprint="", answer=response)

    # --- lifecycle --------------------------------------------------------------

    # --- streamed messages -----------------------------------------------------------

    async def _change_message(
        self,
        tenant: str,
        session_id: str,
        seq: int,
        *,
        if_match: Precondition | None,
        idempotency: IdempotencyRequest | None,
        edit: Callable[[Message, datetime], Message],
        event: Callable[[Session, Message], ev.EventDraft],
    ) -> tuple[Session, Message]:
        """One transaction: lock the session and the message, rewrite it, step the version, record `event`."""
        async with self._transaction() as conn:
            current = await self._lock(conn, tenant, session_id, if_match)
            wanted = seq if 0 < seq <= common.MAX_SEQ else 0
            row = await conn.fetchrow(q.LOCK_MESSAGE, tenant, session_id, wanted)
            if row is None:
                raise MessageNotFound(session_id, seq)
            message = rows.message_from(row)
            now = common.change_time(current)
            changed = edit(message, now)
            arrays = rows.message_arrays(tenant, [rows.as_create(changed)])
            await conn.execute(q.REWRITE_MESSAGE, tenant, session_id, seq, now, *(column[0] for column in arrays))
            session = current.model_copy(update={"version": current.version + 1, "updated_at": now})
            await conn.execute(q.STEP_SESSION, tenant, session_id, session.version, now)
            if message.status is MessageStatus.in_progress and changed.status is not MessageStatus.in_progress:
                citations = rows.citation_arrays([changed])
                if citations[0]:
                    await conn.execute(q.INSERT_CITATIONS, tenant, session_id, changed.created_at, *citations)
            if idempotency is not None:
                await self._store_answer(
                    conn,
                    tenant=tenant,
                    key=idempotency.key,
                    fingerprint=idempotency.fingerprint,
                    answer=idempotency.render(session, [changed]),
                )
            await record_events(conn, [event(session, changed)])
        return session, changed

    async def append_delta(
        self,
        tenant: str,
        session_id: str,
        seq: int,
        content: str,
        *,
        if_match: Precondition | None = None,
        idempotency: IdempotencyRequest | None = None,
    ) -> tuple[Session, Message]:
        return await self._change_message(
            tenant,
            session_id,
            seq,
            if_match=if_match,
            idempotency=idempotency,
            edit=lambda m, now: streaming.apply_delta(
                session_id, m, content, now=now, max_content_bytes=self._max_content_bytes
            ),
            event=lambda session, m: ev.delta_event(tenant, session, seq, content),
        )

    async def update_message(
        self,
        tenant: str,
        session_id: str,
        seq: int,
        changes: dict[str, Any],
        *,
        if_match: Precondition | None = None,
    ) -> tuple[Session, Message]:
        return await self._change_message(
            tenant,
            session_id,
            seq,
            if_match=if_match,
            idempotency=None,
            edit=lambda m, now: streaming.apply_patch(
                session_id, m, changes, now=now, max_content_bytes=self._max_content_bytes
            ),
            event=lambda session, m: ev.message_updated_event(tenant, session, m),
        )

    async def expire_idle_streams(self) -> int:
        """Mark incomplete (each a change with its event) up to 500 streamed messages left idle."""
        async with self._connection() as conn:
            idle = await conn.fetch(q.IDLE_STREAMS, self._stream_idle, 500)
        expired = 0
        for row in idle:
            with contextlib.suppress(MessageNotInProgress, MessageNotFound, SessionNotFound):
                await self._expire_one(row["tenant"], row["session_id"], row["seq"])
                expired += 1
        return expired

    async def _expire_one(self, tenant: str, session_id: str, seq: int) -> None:
        def expire(message: Message, now: datetime) -> Message:
            # Checked again under the row lock: a delta (or another replica) may have come since.
            if (now - message.updated_at).total_seconds() < self._stream_idle:
                raise MessageNotInProgress(session_id, message.seq, "active")
            return streaming.expired(session_id, message, now=now)

        def event(session: Session, message: Message) -> ev.EventDraft:
            return ev.message_updated_event(tenant, session, message)

        await self._change_message(tenant, session_id, seq, if_match=None, idempotency=None, edit=expire, event=event)

    async def _expire_streams(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, min(self._stream_idle / 2, 5.0)))
            try:
                await self.expire_idle_streams()
            except Exception:
                log.warning("marking idle streamed messages incomplete failed; will retry", exc_info=True)

    # --- change events ---------------------------------------------------------------

    async def read_session_events(self, tenant: str, session_id: str, *, after: int, limit: int) -> ev.SessionReplay:
        async with self._connection() as conn:
            return await read_session_events(conn, tenant, session_id, after=after, limit=limit)

    async def read_tenant_events(
        self, tenant: str, *, after: int | None, filters: ev.TenantFilter, limit: int
    ) -> ev.TenantReplay:
        async with self._connection() as conn:
            return await read_tenant_events(conn, tenant, after=after, filters=filters, limit=limit)

    async def check_ready(self) -> None:
        async with self._connection() as conn:
            writable = await conn.fetchval(q.IS_WRITABLE)
        if not writable:
            raise StorageUnavailable("PostgreSQL is a read-only standby")

    async def aclose(self) -> None:
        if self._stream_expiry is not None:
            self._stream_expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream_expiry
            self._stream_expiry = None
        if self._follower is not None:
            await self._follower.aclose()
            self._follower = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self._appends.aclose()
        await self._creates.aclose()
        try:
            await asyncio.wait_for(self._pool.close(), timeout=self._timeout)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self._pool.terminate()
