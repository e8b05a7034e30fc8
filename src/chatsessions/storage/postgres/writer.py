"""Group commit for appends: the appends that arrive while one statement runs go into the next.

One writer task per repository owns the queue. It takes every queued append
to a session that is not already in the batch (a second append to the same
session waits for the next batch, so appends to one session keep their
order), runs them as one statement (`queries.APPEND_BATCH`, one transaction,
one WAL flush) and hands each append its own row. Rows are locked in
(tenant, id) order, so batches of several writers or replicas never
deadlock. An append that the batch statement cannot take (the statement
failed for a reason other than the database being unavailable, say one
append holds a character PostgreSQL refuses) is handed `ALONE` and runs by
itself, so it fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import asyncpg

from chatsessions.errors import StorageFull, StorageUnavailable
from chatsessions.models import utcnow
from chatsessions.storage.base import StoreObserver
from chatsessions.storage.postgres import queries as q

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger("chatsessions.postgres")

# Bounds of one batch statement: appends, messages, and characters of content.
MAX_BATCH_APPENDS: Final = 256
MAX_BATCH_MESSAGES: Final = 2048
MAX_BATCH_CHARS: Final = 8 * 1024 * 1024


class RunAlone:
    """The batch could not take this append: run it by itself."""


ALONE: Final = RunAlone()
Outcome: TypeAlias = "asyncpg.Record | RunAlone | None"


@dataclass(slots=True)
class PendingAppend:
    tenant: str
    session_id: str
    count: int
    expected: int | None  # the version If-Match demands; None: any
    arrays: tuple[list[Any], ...]  # `rows.message_arrays`
    chars: int
    done: asyncio.Future[Outcome] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AppendWriter:
    """Owns the append queue and the task that drains it into batch statements."""

    def __init__(
        self,
        connection: Callable[[], AbstractAsyncContextManager[Conn]],
        *,
        observer: StoreObserver,
    ) -> None:
        self._connection = connection
        self._observer = observer
        self._queue: deque[PendingAppend] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def append(self, pending: PendingAppend) -> Outcome:
        """Queue `pending` and wait for its row (None: no such session; ALONE: run it alone)."""
        if self._closed:
            raise StorageUnavailable("the store is closing")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="chatsessions-postgres-writer")
        self._queue.append(pending)
        self._wakeup.set()
        return await pending.done

    async def aclose(self) -> None:
        """Finish what is queued, then stop the writer."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._observer.queue_depth(len(self._queue))
            batch = self._take()
            try:
                await self._write(batch)
            except BaseException as exc:  # the task itself is cancelled: fail the batch, stop
                for item in batch:
                    if not item.done.done():
                        item.done.set_exception(StorageUnavailable("the store is closing"))
                if isinstance(exc, asyncio.CancelledError):
                    raise
                log.exception("PostgreSQL append writer failed")

    def _take(self) -> list[PendingAppend]:
        """The next batch: queued appends in order, at most one per session, within the bounds."""
        batch: list[PendingAppend] = []
        later: deque[PendingAppend] = deque()
        taken: set[tuple[str, str]] = set()
        messages = chars = 0
        while self._queue:
            item = self._queue.popleft()
            if item.done.done():  # its caller was cancelled while it waited: nobody wants it now
                continue
            key = (item.tenant, item.session_id)
            full = batch and (
                len(batch) >= MAX_BATCH_APPENDS
                or messages + item.count > MAX_BATCH_MESSAGES
                or chars + item.chars > MAX_BATCH_CHARS
            )
            if full:
                self._queue.appendleft(item)
                break
            if key in taken:
                later.append(item)
                continue
            taken.add(key)
            batch.append(item)
            messages += item.count
            chars += item.chars
        self._queue.extendleft(reversed(later))
        return batch

    async def _write(self, batch: list[PendingAppend]) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self._execute(batch)
        except (StorageFull, StorageUnavailable) as exc:
            self._settle(batch, exc)
            return
        except Exception:  # one append may poison the whole statement: each runs alone
            self._settle(batch, ALONE)
            return
        finally:
            self._observer.commit(changes=len(batch), seconds=time.perf_counter() - started)
        for item, outcome in zip(batch, outcomes, strict=True):
            if not item.done.done():
                item.done.set_result(outcome)

    async def _execute(self, batch: list[PendingAppend]) -> list[asyncpg.Record | None]:
        """Each append's row (None: no such session), in batch order."""
        async with self._connection() as conn:
            if len(batch) == 1:  # nothing to share a statement with: the simpler one is cheaper
                return [await conn.fetchrow(q.APPEND, *_single_args(batch[0], now=utcnow()))]
            found = await conn.fetch(q.APPEND_BATCH, *_batch_args(batch, now=utcnow()))
        outcomes: list[asyncpg.Record | None] = [None] * len(batch)
        for row in found:
            outcomes[row["i"] - 1] = row
        return outcomes

    @staticmethod
    def _settle(batch: list[PendingAppend], outcome: Outcome | BaseException) -> None:
        for item in batch:
            if item.done.done():
                continue
            if isinstance(outcome, BaseException):
                item.done.set_exception(outcome)
            else:
                item.done.set_result(outcome)


def _single_args(item: PendingAppend, *, now: datetime) -> tuple[Any, ...]:
    """The arguments of `queries.APPEND`."""
    versions = None if item.expected is None else [item.expected]
    return (item.tenant, item.session_id, item.count, now, versions, *item.arrays)


def _batch_args(batch: list[PendingAppend], *, now: datetime) -> tuple[Any, ...]:
    """The arguments of `queries.APPEND_BATCH`."""
    index: list[int] = []
    order: list[int] = []
    columns: tuple[list[Any], ...] = ([], [], [], [], [])
    for i, item in enumerate(batch, start=1):
        index += [i] * item.count
        order += range(1, item.count + 1)
        for column, values in zip(columns, item.arrays, strict=True):
            column += values
    return (
        [item.tenant for item in batch],
        [item.session_id for item in batch],
        [item.count for item in batch],
        [item.expected for item in batch],
        now,
        index,
        order,
        *columns,
    )
