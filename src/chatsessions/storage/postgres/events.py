"""Change events on PostgreSQL: recorded in the change's transaction, read back, and followed across replicas.

Every replica publishes what the `events` table holds, not what it wrote
itself: `EventFollower` LISTENs on `chatsessions_events` (the table's trigger
notifies at commit), reads the rows after the last id it published and hands
them to the sink. Ids come in commit order (see migration 4), so reading
`id > last` never skips a row that commits later; a missed notification costs
at most `POLL_SECONDS`, the follower's fallback poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from chatsessions.events import ChangeEvent, EventDraft, EventSink, SessionReplay, TenantFilter, TenantReplay
from chatsessions.storage.postgres import queries as q
from chatsessions.storage.postgres import rows

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger("chatsessions.postgres")

CHANNEL = "chatsessions_events"
POLL_SECONDS = 1.0
FOLLOW_PAGE = 1000
PRUNE_INTERVAL_SECONDS = 60.0
PRUNE_BATCH = 500


async def record_events(conn: Conn, drafts: list[EventDraft]) -> None:
    """Insert the events of the change running in `conn`'s transaction (call it last: it takes event_head)."""
    if not drafts:
        return
    await conn.execute(
        q.RECORD_EVENTS,
        [d.tenant for d in drafts],
        [d.session_id for d in drafts],
        [d.version for d in drafts],
        [d.type for d in drafts],
        [d.data for d in drafts],
        [d.user_id for d in drafts],
        [d.document_id for d in drafts],
        [d.section_id for d in drafts],
    )


async def forget_session_events(conn: Conn, tenant: str, session_id: str) -> None:
    """Delete the session's recorded events (a clear or a deletion erases their content)."""
    await conn.execute(q.FORGET_SESSION_EVENTS, tenant, session_id)


def _event_from(row: asyncpg.Record) -> ChangeEvent:
    draft = EventDraft(
        row["tenant"],
        row["session_id"],
        row["version"],
        row["type"],
        row["data"],
        row["user_id"],
        row["document_id"],
        row["section_id"],
    )
    return ChangeEvent(row["id"], draft)


async def read_session_events(conn: Conn, tenant: str, session_id: str, *, after: int, limit: int) -> SessionReplay:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(q.SELECT_SESSION, tenant, session_id)
        if row is None:
            return SessionReplay(None, [], False)
        session = rows.session_from(row)
        if after == session.version:
            return SessionReplay(session, [], True)
        if not 0 <= after < session.version:
            return SessionReplay(session, [], False)
        floor = await conn.fetchval(q.INCARNATION_FLOOR, tenant, session_id)
        found = await conn.fetch(q.SESSION_EVENTS, tenant, session_id, after, floor, limit)
    events = [_event_from(r) for r in found]
    return SessionReplay(session, events, bool(events) and events[0].version == after + 1)


async def read_tenant_events(
    conn: Conn, tenant: str, *, after: int | None, filters: TenantFilter, limit: int
) -> TenantReplay:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        head = int(await conn.fetchval(q.EVENT_HEAD))
        if after is None:
            return TenantReplay([], True, head)
        lowest = await conn.fetchval(q.LOWEST_EVENT)
        # Pruning removes a prefix of ids: a position before what is left was pruned past.
        if not (after == head or (0 <= after < head and lowest is not None and after >= lowest - 1)):
            return TenantReplay([], False, head)
        found = await conn.fetch(
            q.TENANT_EVENTS, tenant, after, filters.user_id, filters.document_id, filters.section_id, limit
        )
    return TenantReplay([_event_from(r) for r in found], True, head)


class EventFollower:
    """Publishes every event any replica commits, in id order, to this process's sink."""

    def __init__(
        self,
        *,
        dsn: str,
        schema: str,
        connection: Callable[[], AbstractAsyncContextManager[Conn]],
        sink: EventSink,
        server_settings: dict[str, str],
        retention_seconds: float,
    ) -> None:
        self._dsn = dsn
        self._schema = schema
        self._connection = connection
        self._sink = sink
        self._server_settings = server_settings
        self._retention = retention_seconds
        self._wake = asyncio.Event()
        self._listener: asyncpg.Connection[asyncpg.Record] | None = None
        self._task: asyncio.Task[None] | None = None
        self._last = 0

    async def start(self) -> None:
        """Take the current head as the start (what committed before is replayed from the table), then follow."""
        async with self._connection() as conn:
            self._last = int(await conn.fetchval(q.EVENT_HEAD))
        await self._listen()
        self._task = asyncio.create_task(self._follow(), name="chatsessions-events-follower")

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: object, /) -> None:
        if payload == self._schema:
            self._wake.set()

    async def _listen(self) -> None:
        try:
            listener: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(
                self._dsn, server_settings=self._server_settings, timeout=5.0
            )
            await listener.add_listener(CHANNEL, self._notified)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("cannot LISTEN for change events (%s); polling every %.0f s", exc, POLL_SECONDS)
            return
        self._listener = listener

    async def _follow(self) -> None:
        next_prune = 0.0
        loop = asyncio.get_running_loop()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_SECONDS)
            self._wake.clear()
            try:
                await self._drain()
                if self._listener is None or self._listener.is_closed():
                    self._listener = None
                    await self._listen()
                if loop.time() >= next_prune:
                    next_prune = loop.time() + PRUNE_INTERVAL_SECONDS
                    await self.prune()
            except Exception:
                log.warning("following change events failed; will retry", exc_info=True)

    async def _drain(self) -> None:
        while True:
            async with self._connection() as conn:
                found = await conn.fetch(q.EVENTS_AFTER, self._last, FOLLOW_PAGE)
            if not found:
                return
            events = [_event_from(r) for r in found]
            self._last = events[-1].id
            self._sink.publish(events)
            if len(found) < FOLLOW_PAGE:
                return

    async def prune(self) -> int:
        """Delete the events older than the retention, a batch a statement; return how many."""
        deleted = 0
        while True:
            async with self._connection() as conn:
                status = await conn.execute(q.PRUNE_EVENTS, self._retention, PRUNE_BATCH)
            count = int(status.split()[-1])
            deleted += count
            if count < PRUNE_BATCH:
                return deleted

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
