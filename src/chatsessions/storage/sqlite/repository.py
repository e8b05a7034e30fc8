"""`SqliteSessionRepository`: the embedded store (store=sqlite), and store=memory on SQLite's memdb.

Writes go to the one `Writer` (group commit); reads go to `Readers` (WAL
snapshots in threads). Nothing here holds a lock across I/O: the writer's
queue is the only order there is, and it is the order of acknowledgement.

Idempotency-Keys: a claimed key lives in memory only while its request runs
(a claim dies with the process, as the request does); a stored answer lives
in the database, written in the same transaction as the change it answers,
and is found by an index lookup. Expired answers are purged in small batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import apsw
from pydantic_core import from_json, to_json

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
    StorageFailed,
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
    Order,
    Precondition,
    Retention,
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
    patch_session,
    utcnow,
)
from chatsessions.storage.base import NullObserver, StoreObserver
from chatsessions.storage.common import (
    MAX_SEQ,
    after_append,
    after_clear,
    after_message_deleted,
    change_time,
    check_message_ids,
    check_precondition,
    citation_listing,
    citations_sql,
    cited_doc_ids,
    equalities,
    from_us,
    listing_page,
    listing_sql,
    message_ids,
    new_messages,
    new_session,
    seq_bounds,
    to_us,
)
from chatsessions.storage.sqlite import rows, streams
from chatsessions.storage.sqlite.events import (
    forget_session,
    prune_events,
    read_session_events,
    read_tenant_events,
    record_event,
)
from chatsessions.storage.sqlite.reader import Readers
from chatsessions.storage.sqlite.schema import DataDirLock, Location, configure_writer, migrate
from chatsessions.storage.sqlite.writer import Head, HeadKey, Tx, Writer
from chatsessions.text import SearchQuery, content_text, match_expression, scoped_words, snippet

log = logging.getLogger("chatsessions.sqlite")


class _StillActive(Exception):
    """A streamed message changed since the idle timeout found it: it stays in_progress."""


READER_THREADS = 4
PURGE_BATCH = 500  # expired Idempotency-Key rows a purge transaction deletes at most
# Rows (messages with their words and citations) one sweeper transaction deletes at most: each
# holds the writer only a few milliseconds, so appends queued behind it barely wait.
PURGE_ROWS = 50
MERGE_PAGES = 16  # full-text leaf pages one merge step writes
MERGE_STEPS = 256  # merge steps one purge takes at most (about 4,000 pages of the index)
PURGE_SESSIONS = 64  # expired sessions one purge transaction looks at
ERASE_BATCH = 100  # sessions one transaction of a bulk erasure deletes


class SqliteSessionRepository:
    """Sessions in one SQLite database; see the module docstring."""

    def __init__(
        self,
        *,
        location: Location,
        writer: Writer,
        readers: Readers,
        lock: DataDirLock | None,
        settings: Settings,
    ) -> None:
        self._location = location
        self._writer = writer
        self._readers = readers
        self._lock = lock
        self._idempotency_ttl_us = int(settings.idempotency_ttl_seconds * 1e6)
        self._max_page_bytes = settings.max_page_bytes
        self._events_retention_us = int(settings.events_retention_seconds * 1e6)
        self._max_content_bytes = settings.max_content_bytes
        self._stream_idle_us = int(settings.stream_idle_seconds * 1e6)
        self._stream_check_seconds = max(0.05, min(settings.stream_idle_seconds / 2, 5.0))
        self._stream_expiry: asyncio.Task[None] | None = None
        self._retention = Retention(settings.retention_idle_seconds)
        self._purge_interval = settings.purge_interval_seconds
        # Set (by the writer thread) when a change deleted content: the next purge checkpoints
        # the WAL with TRUNCATE, so the deleted bytes leave every file of the data directory.
        self._erased = False
        self._claims: dict[HeadKey, str] = {}  # (tenant, key) -> fingerprint, while the first request runs
        self._maintenance: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        observer: StoreObserver | None = None,
        vfs: str | None = None,
        sink: ev.EventSink | None = None,
    ) -> SqliteSessionRepository:
        """Lock the data directory, open (and upgrade) the database, start the writer.

        `vfs` names an apsw VFS to open the database through (the tests' fault seam);
        `sink` receives the committed change events (on the event loop, in commit order).

        Raises:
            StorageLocked, StorageIncompatible, StorageCorrupted, StorageUnavailable.
        """
        location = Location.for_settings(settings, vfs=vfs)
        lock = None if location.in_memory else DataDirLock.acquire(settings.data_dir)
        writer = Writer(
            lambda: location.connect(readonly=False),
            cache_sessions=settings.cache_sessions,
            cache_bytes=settings.cache_bytes,
            observer=observer or NullObserver(),
            on_commit=(sink or ev.NullSink()).publish,
        )

        def setup(conn: apsw.Connection) -> None:
            configure_writer(conn, location)
            applied = migrate(conn, location)
            if applied:
                log.info("%s: applied schema versions %s", location.name, applied)

        try:
            await writer.start(setup)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        readers = Readers(lambda: location.connect(readonly=True), threads=READER_THREADS)
        repository = cls(location=location, writer=writer, readers=readers, lock=lock, settings=settings)
        repository._maintenance = asyncio.create_task(repository._maintain(), name="chatsessions-sqlite-maintenance")
        repository._stream_expiry = asyncio.create_task(repository._expire_streams(), name="chatsessions-stream-expiry")
        return repository

    # --- helpers ------------------------------------------------------------

    def _alive_args(self) -> tuple[int, int]:
        """The arguments of `rows.ALIVE`: now, and the idle cutoff."""
        now = utcnow()
        cutoff = self._retention.idle_cutoff(now)
        return to_us(now), rows.NO_CUTOFF if cutoff is None else to_us(cutoff)

    def _any_head(self, tx: Tx, key: HeadKey) -> Head | None:
        """The session's head, expired or not (cached, or read with the writer's connection)."""
        head = tx.heads.get(key)
        if head is None:
            row = next(tx.conn.execute(rows.SELECT_SESSION, key), None)
            if row is None:
                return None
            head = rows.head_from(row)
            tx.heads.put(key, head)
        return head

    def _head(self, tx: Tx, key: HeadKey, if_match: Precondition | None = None) -> Head:
        """The live session's head; SessionNotFound when missing or expired, PreconditionFailed."""
        head = self._any_head(tx, key)
        if head is None or self._retention.expired(head.session, utcnow()):
            raise SessionNotFound(key[1])
        check_precondition(key[1], head.session.version, if_match)
        return head

    def _clear_expired(self, tx: Tx, key: HeadKey) -> None:
        """Purge the session now if it exists but has expired, so its id is free again."""
        head = self._any_head(tx, key)
        if head is not None and self._retention.expired(head.session, utcnow()):
            self._remove_session(tx, key, head.pk, expired=True)

    def _remove_session(self, tx: Tx, key: HeadKey, pk: int, *, expired: bool, announce: bool = True) -> None:
        """Delete a session with everything that held its content, in the caller's transaction.

        The one place where a session's deletion is recorded (deleted, erased, expired or
        replaced by an import): its recorded events go (they hold its content), and, unless
        an import replaces it, a `session.deleted` event ends its feed.
        """
        head = self._any_head(tx, key) if announce else None
        forget_session(tx, *key)
        if head is not None:
            record_event(tx, ev.deleted_event(key[0], head.session))
        self._delete_messages(tx.conn, pk)
        tx.conn.execute(rows.DELETE_ANSWERS, (pk,))
        tx.conn.execute(rows.DELETE_SESSION, (pk,))
        tx.drop_head(key)
        self._erased = True

    def _store_answer(
        self, tx: Tx, tenant: str, idempotency: IdempotencyRequest | None, head: Head, messages: list[Message]
    ) -> None:
        if idempotency is not None:
            answer = idempotency.render(head.session, messages)
            self._insert_answer(tx.conn, tenant, idempotency.key, idempotency.fingerprint, answer, head.pk)

    def _insert_answer(
        self, conn: apsw.Connection, tenant: str, key: str, fingerprint: str, answer: StoredResponse, pk: int | None
    ) -> None:
        expires = to_us(utcnow()) + self._idempotency_ttl_us
        headers = to_json(answer.headers).decode()
        conn.execute(rows.STORE_ANSWER, (tenant, key, fingerprint, answer.status, answer.body, headers, pk, expires))

    @staticmethod
    def _insert_messages(conn: apsw.Connection, tenant: str, session_id: str, pk: int, added: list[Message]) -> None:
        """Insert messages with their full-text words and citations (in the caller's transaction)."""
        for message in added:
            (rowid,) = next(conn.execute(rows.INSERT_MESSAGE, rows.message_values(pk, message)))
            if message.status is MessageStatus.in_progress:
                streams.start_stream(conn, pk, message)  # indexed once it completes
            else:
                SqliteSessionRepository._index_message(conn, tenant, session_id, pk, rowid, message)

    @staticmethod
    def _index_message(
        conn: apsw.Connection, tenant: str, session_id: str, pk: int, rowid: int, message: Message
    ) -> None:
        """A message's full-text words and citations (in the caller's transaction)."""
        found = scoped_words(tenant, message.role.value, content_text(message.content))
        if found:
            conn.execute(rows.INDEX_WORDS, (rowid, " ".join(found)))
        created = to_us(message.created_at)
        for ordinal, doc_id, reference in cited_doc_ids(message.references):
            citation = (tenant, doc_id, created, session_id, message.seq, ordinal, pk, to_json(reference).decode())
            conn.execute(rows.INSERT_CITATION, citation)

    def _delete_messages(self, conn: apsw.Connection, pk: int) -> None:
        """Delete a session's messages, their words, their citations, and the answers that held them."""
        conn.execute(rows.UNINDEX_SESSION, (pk,))
        conn.execute(rows.DELETE_CITATIONS, (pk,))
        streams.drop_streams(conn, pk)
        conn.execute(rows.DELETE_MESSAGES, (pk,))
        conn.execute(rows.DELETE_ANSWERS, (pk,))
        self._erased = True

    async def _write(self, change: Any, *, idempotency: IdempotencyRequest | None = None, tenant: str = "") -> Any:
        """Submit a change; a key claimed for it is released once its answer committed with it.

        On failure the claim stays for the caller's `idempotency_finish` (store a 4xx, release on a 5xx).
        """
        result = await self._writer.submit(change)
        if idempotency is not None:
            self._claims.pop((tenant, idempotency.key), None)
        return result

    # --- sessions -------------------------------------------------------------

    async def create_session(
        self, tenant: str, data: SessionCreate, *, idempotency: IdempotencyRequest | None = None
    ) -> Session:
        session = new_session(data, now=utcnow())

        def change(tx: Tx) -> Session:
            self._clear_expired(tx, (tenant, session.id))
            values = rows.session_values(tenant, session)
            row = next(tx.conn.execute(rows.INSERT_SESSION, values), None)
            if row is None:
                raise SessionExists(session.id)
            head = Head(row[0], session, rows.head_size(*values[5:8]))
            tx.put_head((tenant, session.id), head)
            record_event(tx, ev.session_event(tenant, session, ev.SESSION_CREATED))
            self._store_answer(tx, tenant, idempotency, head, [])
            return session

        result: Session = await self._write(change, idempotency=idempotency, tenant=tenant)
        return result

    async def get_or_create_session(self, tenant: str, session_id: str, data: SessionCreate) -> tuple[Session, bool]:
        key = (tenant, session_id)

        def change(tx: Tx) -> tuple[Session, bool]:
            with contextlib.suppress(SessionNotFound):
                return self._head(tx, key).session, False
            self._clear_expired(tx, key)
            session = new_session(data, session_id=session_id, now=utcnow())
            values = rows.session_values(tenant, session)
            (pk,) = next(tx.conn.execute(rows.INSERT_SESSION, values))
            tx.put_head(key, Head(pk, session, rows.head_size(*values[5:8])))
            record_event(tx, ev.session_event(tenant, session, ev.SESSION_CREATED))
            return session, True

        result: tuple[Session, bool] = await self._write(change)
        return result

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        alive = self._alive_args()

        def read(conn: apsw.Connection) -> Session | None:
            row = next(conn.execute(rows.SELECT_LIVE_SESSION, (tenant, session_id, *alive)), None)
            return None if row is None else rows.head_from(row).session

        return await self._readers.run(read)

    async def list_sessions(
        self, tenant: str, *, filters: SessionFilter, limit: int, cursor: SessionCursor | None
    ) -> SessionListing:
        sql, args = listing_sql(
            columns=rows.SESSION_COLUMNS,
            filters=filters,
            limit=limit + 1,
            cursor=cursor,
            placeholder=lambda n: f"?{n}",
            moment=to_us,
            tenant=tenant,
            alive=(rows.ALIVE.format(p="").replace("?", "{}"), list(self._alive_args())),
        )

        def read(conn: apsw.Connection) -> list[Session]:
            return [rows.head_from(row).session for row in conn.execute(sql, args)]

        return listing_page(await self._readers.run(read), limit)

    async def patch_session(
        self, tenant: str, session_id: str, patch: SessionPatch, *, if_match: Precondition | None = None
    ) -> Session:
        key = (tenant, session_id)
        changes = patch.model_dump(mode="json", exclude_unset=True)

        def change(tx: Tx) -> Session:
            head = self._head(tx, key, if_match)
            session = patch_session(head.session, changes, now=change_time(head.session))
            values = rows.update_values(head.pk, session)
            tx.conn.execute(rows.UPDATE_SESSION, values)
            tx.put_head(key, Head(head.pk, session, rows.head_size(*values[3:6])))
            record_event(tx, ev.session_event(tenant, session, ev.SESSION_UPDATED))
            return session

        result: Session = await self._write(change)
        return result

    async def delete_session(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> None:
        key = (tenant, session_id)

        def change(tx: Tx) -> None:
            head = self._head(tx, key, if_match)
            self._remove_session(tx, key, head.pk, expired=False)

        await self._write(change)

    async def delete_sessions(self, tenant: str, *, user_id: str, document_id: str | None = None) -> int:
        clauses, extra = ("", ()) if document_id is None else (" AND document_id = ?", (document_id,))
        sql = rows.USER_SESSIONS.format(filters=clauses)

        def change(tx: Tx) -> int:
            found = list(tx.conn.execute(sql, (tenant, user_id, *extra, ERASE_BATCH)))
            for pk, sid in found:
                self._remove_session(tx, (tenant, sid), pk, expired=False)
            return len(found)

        # Batches of sessions, one transaction each: appends to other sessions keep flowing.
        deleted = 0
        while True:
            count: int = await self._write(change)
            deleted += count
            if count < ERASE_BATCH:
                return deleted

    # --- messages -------------------------------------------------------------

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageCreate],
        *,
        if_match: Precondition | None = None,
        idempotency: IdempotencyRequest | None = None,
    ) -> tuple[Session, list[Message]]:
        key = (tenant, session_id)
        ids = message_ids(messages)

        def change(tx: Tx) -> tuple[Session, list[Message]]:
            head = self._head(tx, key, if_match)
            if ids:
                existing = {}
                for message_id in ids:
                    found = next(tx.conn.execute(rows.SELECT_CLIENT_ID, (head.pk, message_id)), None)
                    if found is not None:
                        existing[message_id] = found[0]
                check_message_ids(session_id, messages, existing)
            now = change_time(head.session)
            added = new_messages(messages, first_seq=head.session.last_seq + 1, now=now)
            self._insert_messages(tx.conn, tenant, session_id, head.pk, added)
            session = after_append(head.session, len(added), now=now)
            tx.conn.execute(rows.UPDATE_COUNTERS, rows.counter_values(head.pk, session))
            new_head = head.moved(session)
            tx.put_head(key, new_head)
            record_event(tx, ev.messages_event(tenant, session, added))
            self._store_answer(tx, tenant, idempotency, new_head, added)
            return session, added

        result: tuple[Session, list[Message]] = await self._write(change, idempotency=idempotency, tenant=tenant)
        return result

    async def list_messages(self, tenant: str, session_id: str, query: MessageQuery) -> tuple[list[Message], bool]:
        after, before = seq_bounds(query)
        ascending = query.order is Order.asc
        limit, max_bytes = query.limit, self._max_page_bytes
        alive = self._alive_args()

        def read(conn: apsw.Connection) -> tuple[list[Message], bool]:
            found = next(conn.execute(rows.SELECT_SESSION_PK, (tenant, session_id, *alive)), None)
            if found is None:
                raise SessionNotFound(session_id)
            (pk,) = found
            page: list[Message] = []
            size = 0
            sql = rows.PAGE_ASC if ascending else rows.PAGE_DESC
            # The cursor is lazy: rows past where the page stops are never read.
            for content_bytes, body in conn.execute(sql, (pk, after, before, limit)):
                if page and size + content_bytes > max_bytes:
                    return page, True
                size += content_bytes
                page.append(rows.message_from(body))
            if len(page) < limit:
                return page, False
            last = page[-1].seq
            beyond = (pk, last, before) if ascending else (pk, after, last)
            return page, next(conn.execute(rows.ANY_AFTER, beyond), None) is not None

        return await self._readers.run(read)

    async def get_message(self, tenant: str, session_id: str, seq: int) -> Message:
        alive = self._alive_args()

        def read(conn: apsw.Connection) -> Message:
            found = next(conn.execute(rows.SELECT_SESSION_PK, (tenant, session_id, *alive)), None)
            if found is None:
                raise SessionNotFound(session_id)
            if not 0 < seq < 2**63:
                raise MessageNotFound(session_id, seq)
            row = next(conn.execute(rows.SELECT_MESSAGE, (found[0], seq)), None)
            if row is None:
                raise MessageNotFound(session_id, seq)
            return rows.message_from(row[0])

        return await self._readers.run(read)

    async def clear_messages(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> Session:
        key = (tenant, session_id)

        def change(tx: Tx) -> Session:
            head = self._head(tx, key, if_match)
            self._delete_messages(tx.conn, head.pk)
            session = after_clear(head.session, now=change_time(head.session))
            tx.conn.execute(rows.UPDATE_COUNTERS, rows.counter_values(head.pk, session))
            tx.put_head(key, head.moved(session))
            forget_session(tx, tenant, session_id)
            record_event(tx, ev.session_event(tenant, session, ev.SESSION_CLEARED))
            return session

        result: Session = await self._write(change)
        return result

    async def delete_message(
        self, tenant: str, session_id: str, seq: int, *, if_match: Precondition | None = None
    ) -> Session:
        key = (tenant, session_id)

        def change(tx: Tx) -> Session:
            head = self._head(tx, key, if_match)
            found = next(tx.conn.execute(rows.DELETE_MESSAGE, (head.pk, seq)), None) if 0 < seq < 2**63 else None
            if found is None:
                raise MessageNotFound(session_id, seq)
            tx.conn.execute(rows.UNINDEX_MESSAGE, found)
            tx.conn.execute(rows.DELETE_MESSAGE_CITATIONS, (head.pk, seq))
            tx.conn.execute(rows.DELETE_ANSWERS, (head.pk,))
            self._erased = True
            session = after_message_deleted(head.session, now=change_time(head.session))
            tx.conn.execute(rows.UPDATE_COUNTERS, rows.counter_values(head.pk, session))
            tx.put_head(key, head.moved(session))
            tx.conn.execute(streams.END_STREAM, (head.pk, seq))
            record_event(tx, ev.message_deleted_event(tenant, session, seq))
            return session

        result: Session = await self._write(change)
        return result

    # --- search and citations ----------------------------------------------------

    async def search(
        self, tenant: str, query: SearchQuery, *, filters: SearchFilter, limit: int, offset: int
    ) -> SearchResult:
        expression = match_expression(tenant, filters.role.value if filters.role else None, query)
        args: list[Any] = [expression, limit + 1, offset]
        on_session = equalities(
            args,
            lambda n: f"?{n}",
            "s.{}".format,
            user_id=filters.user_id,
            document_id=filters.document_id,
            section_id=filters.section_id,
        )
        # Only live sessions' messages: the session's "not expired" condition, its arguments numbered on.
        alive = [f"?{len(args) + 1 + i}" for i in range(2)]
        args += self._alive_args()
        on_session.append(rows.ALIVE.format(p="s.").replace("?", "{}").format(*alive))
        clauses = "".join(f" AND {c}" for c in on_session)
        sql = rows.SEARCH.format(join=rows.SEARCH_JOIN, filters=clauses)

        def read(conn: apsw.Connection) -> list[SearchHit]:
            hits = []
            for sid, seq, body in conn.execute(sql, args):
                message = rows.message_from(body)
                text = content_text(message.content)
                hits.append(
                    SearchHit(
                        session_id=sid,
                        seq=seq,
                        role=message.role,
                        created_at=message.created_at,
                        snippet=snippet(text, query),
                    )
                )
            return hits

        found = await self._readers.run(read)
        return SearchResult(found[:limit], offset + limit if len(found) > limit else None)

    async def list_citations(
        self, tenant: str, doc_id: str, *, filters: CitationFilter, limit: int, cursor: CitationCursor | None
    ) -> CitationListing:
        sql, args = citations_sql(
            tenant=tenant,
            doc_id=doc_id,
            filters=filters,
            limit=limit + 1,
            cursor=cursor,
            placeholder=lambda n: f"?{n}",
            moment=to_us,
            alive=(rows.ALIVE.format(p="s.").replace("?", "{}"), list(self._alive_args())),
        )

        def read(conn: apsw.Connection) -> list[tuple[Citation, int]]:
            return [
                (Citation(session_id=sid, seq=seq, created_at=from_us(at), reference=from_json(reference)), ordinal)
                for sid, seq, at, ordinal, reference in conn.execute(sql, args)
            ]

        return citation_listing(await self._readers.run(read), limit)

    # --- streamed messages -----------------------------------------------------------

    def _change_message(
        self,
        tenant: str,
        session_id: str,
        seq: int,
        if_match: Precondition | None,
        idempotency: IdempotencyRequest | None,
        edit: Any,
        event: Any,
    ) -> Any:
        """A writer change that rewrites one message (`edit(message, now)`), steps the version, records `event`."""
        key = (tenant, session_id)

        def change(tx: Tx) -> tuple[Session, Message]:
            head = self._head(tx, key, if_match)
            rowid, message = streams.message_row(tx.conn, session_id, head.pk, seq)
            now = change_time(head.session)
            changed: Message = edit(message, now)
            streams.rewrite_message(tx.conn, head.pk, rowid, changed)
            if message.status is MessageStatus.in_progress and changed.status is not MessageStatus.in_progress:
                self._index_message(tx.conn, tenant, session_id, head.pk, rowid, changed)
            session = head.session.model_copy(update={"version": head.session.version + 1, "updated_at": now})
            tx.conn.execute(rows.UPDATE_COUNTERS, rows.counter_values(head.pk, session))
            new_head = head.moved(session)
            tx.put_head(key, new_head)
            record_event(tx, event(session, changed))
            self._store_answer(tx, tenant, idempotency, new_head, [changed])
            return session, changed

        return change

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
        change = self._change_message(
            tenant,
            session_id,
            seq,
            if_match,
            idempotency,
            lambda m, now: streaming.apply_delta(
                session_id, m, content, now=now, max_content_bytes=self._max_content_bytes
            ),
            lambda session, m: ev.delta_event(tenant, session, seq, content),
        )
        result: tuple[Session, Message] = await self._write(change, idempotency=idempotency, tenant=tenant)
        return result

    async def update_message(
        self,
        tenant: str,
        session_id: str,
        seq: int,
        changes: dict[str, Any],
        *,
        if_match: Precondition | None = None,
    ) -> tuple[Session, Message]:
        change = self._change_message(
            tenant,
            session_id,
            seq,
            if_match,
            None,
            lambda m, now: streaming.apply_patch(
                session_id, m, changes, now=now, max_content_bytes=self._max_content_bytes
            ),
            lambda session, m: ev.message_updated_event(tenant, session, m),
        )
        result: tuple[Session, Message] = await self._write(change)
        return result

    async def expire_idle_streams(self) -> int:
        """Mark incomplete, each as a change with its event, up to PURGE_BATCH streamed messages left idle."""
        before = to_us(utcnow()) - self._stream_idle_us
        idle = await self._readers.run(lambda conn: streams.idle_streams(conn, before_us=before, limit=PURGE_BATCH))
        expired = 0
        for tenant, session_id, seq in idle:

            def expire(message: Message, now: Any, session_id: str = session_id) -> Message:
                # Checked again in the change: a delta may have come since the read.
                if message.status is MessageStatus.in_progress and to_us(message.updated_at) >= before:
                    raise _StillActive()
                return streaming.expired(session_id, message, now=now)

            change = self._change_message(
                tenant,
                session_id,
                seq,
                None,
                None,
                expire,
                lambda session, m, tenant=tenant: ev.message_updated_event(tenant, session, m),
            )
            with contextlib.suppress(_StillActive, MessageNotFound, SessionNotFound, MessageNotInProgress):
                await self._write(change)
                expired += 1
        return expired

    async def _expire_streams(self) -> None:
        while True:
            await asyncio.sleep(self._stream_check_seconds)
            try:
                await self.expire_idle_streams()
            except Exception:
                log.warning("marking idle streamed messages incomplete failed; will retry", exc_info=True)

    # --- change events ------------------------------------------------------------

    async def read_session_events(self, tenant: str, session_id: str, *, after: int, limit: int) -> ev.SessionReplay:
        return await self._readers.run(
            lambda conn: read_session_events(conn, tenant, session_id, after=after, limit=limit)
        )

    async def read_tenant_events(
        self, tenant: str, *, after: int | None, filters: ev.TenantFilter, limit: int
    ) -> ev.TenantReplay:
        return await self._readers.run(
            lambda conn: read_tenant_events(conn, tenant, after=after, filters=filters, limit=limit)
        )

    async def prune_events(self) -> int:
        """Delete up to PURGE_BATCH events older than the retention; return how many."""
        cutoff = to_us(utcnow()) - self._events_retention_us

        def change(tx: Tx) -> int:
            return prune_events(tx, older_than_us=cutoff, batch=PURGE_BATCH)

        deleted: int = await self._writer.submit(change)
        return deleted

    # --- idempotency ------------------------------------------------------------

    async def idempotency_begin(self, tenant: str, key: str, fingerprint: str) -> StoredResponse | None:
        claim = (tenant, key)
        held = self._claims.get(claim)
        if held is not None:
            if held != fingerprint:
                raise IdempotencyKeyReused()
            raise IdempotencyInProgress()
        # Claim before the lookup awaits: a second request with this key now sees the claim.
        self._claims[claim] = fingerprint
        now = to_us(utcnow())

        def read(conn: apsw.Connection) -> tuple[Any, ...] | None:
            return next(conn.execute(rows.SELECT_ANSWER, (tenant, key, now)), None)

        try:
            row = await self._readers.run(read)
        except BaseException:
            self._claims.pop(claim, None)
            raise
        if row is None:
            return None  # the caller holds the claim
        self._claims.pop(claim, None)
        stored_fingerprint, status, body, headers = row
        if stored_fingerprint != fingerprint:
            raise IdempotencyKeyReused()
        return StoredResponse(status, bytes(body), dict(from_json(headers)))

    async def idempotency_finish(self, tenant: str, key: str, response: StoredResponse | None) -> None:
        claim = (tenant, key)
        fingerprint = self._claims.get(claim)
        if response is None or fingerprint is None:
            self._claims.pop(claim, None)
            return

        def change(tx: Tx) -> None:
            self._insert_answer(tx.conn, tenant, key, fingerprint, response, None)

        try:
            await self._writer.submit(change)
        finally:
            self._claims.pop(claim, None)

    # --- lifecycle ----------------------------------------------------------------

    async def _maintain(self) -> None:
        """The sweeper: every purge interval, `purge()`."""
        while True:
            await asyncio.sleep(self._purge_interval)
            try:
                await self.purge()
                while await self.prune_events() == PURGE_BATCH:
                    pass
            except Exception:
                log.warning("the purge of expired data failed; will retry", exc_info=True)

    async def purge(self) -> int:
        """Purge expired sessions and Idempotency-Keys, then erase deleted bytes from the files.

        Each transaction deletes at most `PURGE_ROWS` messages, so appends keep flowing between
        them. An expired session is already invisible; a crash mid-purge leaves it invisible
        and the next purge goes on. Last, when anything was deleted since the previous purge,
        the WAL is checkpointed with TRUNCATE (with `secure_delete`, the database file holds
        zeros where deleted content was; after the truncation, no old WAL frame holds it).

        Returns:
            How many sessions were purged.
        """
        purged = 0
        while True:
            sessions, rows_deleted = await self._writer.submit(self._purge_batch)
            purged += sessions
            if rows_deleted == 0:
                break
        while await self.purge_expired_answers() == PURGE_BATCH:
            pass
        if self._erased and not self._location.in_memory:
            self._erased = False
            # FTS5 keeps a deleted word's term in its segments (secure-delete drops its
            # postings, not always the term): merging the segments drops it. A pass over the
            # full-text index, once per purge interval that followed a deletion, in small steps.
            # Bounded: under a steady stream of appends (each adds a small segment) there is always
            # a little more to merge; what is left waits for the next purge.
            steps = 0
            while await self._writer.submit(self._merge_words_step):
                steps += 1
                if steps >= MERGE_STEPS:
                    break
            busy, *_ = await self._writer.submit_outside(self._checkpoint)
            if busy or steps >= MERGE_STEPS:  # a reader held an old snapshot, or merging was cut short
                self._erased = True  # the next purge goes on
        return purged

    @staticmethod
    def _merge_words_step(tx: Tx) -> bool:
        """Merge a few pages of full-text segments; whether there was work (FTS5: 2+ changes)."""
        before = tx.conn.total_changes()
        tx.conn.execute(rows.MERGE_WORDS, (-MERGE_PAGES,))
        return tx.conn.total_changes() - before >= 2

    @staticmethod
    def _checkpoint(conn: apsw.Connection) -> tuple[int, ...]:
        return tuple(next(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")))

    def _purge_batch(self, tx: Tx) -> tuple[int, int]:
        """One purge transaction: (sessions removed, rows deleted), at most about `PURGE_BATCH` rows."""
        now, cutoff = self._alive_args()
        expired = list(tx.conn.execute(rows.EXPIRED_BY_TIME, (now, PURGE_SESSIONS)))
        if cutoff != rows.NO_CUTOFF:
            expired += tx.conn.execute(rows.EXPIRED_BY_IDLE, (cutoff, PURGE_SESSIONS))
        budget = PURGE_ROWS
        sessions = deleted = 0
        done: set[int] = set()
        for pk, tenant, sid in expired:
            if pk in done:
                continue
            done.add(pk)
            end = next(tx.conn.execute(rows.CHUNK_END, (pk, budget)), None)
            upto = MAX_SEQ if end is None else end[0]
            tx.conn.execute(rows.UNINDEX_CHUNK, (pk, upto))
            tx.conn.execute(rows.DELETE_CITATIONS_CHUNK, (pk, upto))
            tx.conn.execute(rows.DELETE_MESSAGES_CHUNK, (pk, upto))
            chunk = tx.conn.changes()
            deleted += chunk + 1
            budget -= chunk
            self._erased = True
            if end is not None:  # the session has more messages: the next transaction goes on
                break
            self._remove_session(tx, (tenant, sid), pk, expired=True)
            sessions += 1
            if budget <= 0:
                break
        return sessions, deleted

    # --- export and import ------------------------------------------------------

    async def export_sessions(
        self, tenant: str, *, filters: ExportFilter, after: str | None, limit: int
    ) -> list[Session]:
        args: list[Any] = []
        found = equalities(
            args, lambda _: "?", str, user_id=filters.user_id, document_id=filters.document_id, id=filters.session_id
        )
        sql = rows.EXPORT_SESSIONS.format(filters="".join(f" AND {c}" for c in found))
        parameters = (tenant, after or "", *args, *self._alive_args(), limit)

        def read(conn: apsw.Connection) -> list[Session]:
            return [rows.head_from(row).session for row in conn.execute(sql, parameters)]

        return await self._readers.run(read)

    async def import_session(
        self, tenant: str, session: Session, messages: list[Message], *, replace: bool
    ) -> ImportOutcome:
        key = (tenant, session.id)
        values = rows.session_values(tenant, session)

        def change(tx: Tx) -> ImportOutcome:
            outcome = ImportOutcome.created
            self._clear_expired(tx, key)
            head = self._any_head(tx, key)
            if head is not None:
                if not replace:
                    return ImportOutcome.skipped
                self._remove_session(tx, key, head.pk, expired=False, announce=False)
                outcome = ImportOutcome.replaced
            (pk,) = next(tx.conn.execute(rows.INSERT_SESSION, values))
            self._insert_messages(tx.conn, tenant, session.id, pk, messages)
            tx.put_head(key, Head(pk, session, rows.head_size(*values[5:8])))
            return outcome

        result: ImportOutcome = await self._write(change)
        return result

    async def purge_expired_answers(self) -> int:
        """Delete up to PURGE_BATCH expired Idempotency-Key answers; return how many."""
        now = to_us(utcnow())

        def change(tx: Tx) -> int:
            tx.conn.execute(rows.PURGE_ANSWERS, (now, PURGE_BATCH))
            return tx.conn.changes()

        deleted: int = await self._writer.submit(change)
        return deleted

    async def check_ready(self) -> None:
        if self._writer.failed:
            raise StorageFailed("an earlier sync of the disk failed; writes are refused until the service restarts")
        await self._writer.submit(lambda tx: None)

    async def integrity_check(self) -> list[str]:
        """`PRAGMA integrity_check` (reads the whole file): the problems found, none when healthy."""

        def read(conn: apsw.Connection) -> list[str]:
            found = [str(row[0]) for row in conn.execute("PRAGMA integrity_check")]
            return [] if found == ["ok"] else found

        return await self._readers.run(read)

    async def aclose(self) -> None:
        if self._stream_expiry is not None:
            self._stream_expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stream_expiry
            self._stream_expiry = None
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        await self._readers.aclose()
        await self._writer.stop()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
