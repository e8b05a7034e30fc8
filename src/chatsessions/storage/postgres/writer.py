"""Group commit: the changes that arrive while one statement runs go into the next one.

A `GroupCommit` owns a queue and the one task that drains it. The task takes
every queued change to a session that is not already in the batch (a second
change to the same session waits for the next batch, so changes to one
session keep their order), runs them as one statement (one transaction, one
WAL flush) and hands each change its own row. Appends and creates each have
their queue and their batch statement. `queries.APPEND_BATCH` never waits
for a row lock (it leaves a session that another transaction holds to run by
itself), so one busy session does not hold up the queue; `queries.CREATE_BATCH`
inserts in (tenant, id) order, so batches of several replicas never wait for
each other in a cycle.

A change that its batch cannot take (the statement failed for a reason other
than the database being unavailable: one change may hold something
PostgreSQL refuses) is handed `ALONE`, and its caller runs it by itself, so
it fails alone. When the database is unavailable, every change of the batch
fails with it (one statement: they committed all together or not at all).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Generic, TypeAlias, TypeVar

import asyncpg

from chatsessions import events as ev
from chatsessions.errors import StorageFull, StorageUnavailable
from chatsessions.models import MessageCreate, utcnow
from chatsessions.storage import common
from chatsessions.storage.base import StoreObserver
from chatsessions.storage.postgres import queries as q
from chatsessions.storage.postgres import rows
from chatsessions.storage.postgres.events import record_events

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Conn: TypeAlias = PoolConnectionProxy[asyncpg.Record]

log = logging.getLogger("chatsessions.postgres")

# Bounds of one batch statement: changes, and their weight (about their bytes).
MAX_BATCH_CHANGES: Final = 256
MAX_BATCH_WEIGHT: Final = 8 * 1024 * 1024
MESSAGE_WEIGHT: Final = 4096  # what a message row costs beside its content: at most ~2,000 rows a batch


class RunAlone:
    """The batch could not take this change: its caller runs it by itself."""


ALONE: Final = RunAlone()
# A change's row (see the batch statements), None when the statement answered no row, or ALONE.
Outcome: TypeAlias = "asyncpg.Record | RunAlone | None"


def _future() -> asyncio.Future[Outcome]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True, kw_only=True)
class Pending:
    """One queued change to one session."""

    tenant: str
    session_id: str
    weight: int
    done: asyncio.Future[Outcome] = field(default_factory=_future)


@dataclass(slots=True, kw_only=True)
class PendingAppend(Pending):
    count: int
    expected: int | None  # the version If-Match demands; None: any
    arrays: tuple[list[Any], ...]  # `rows.message_arrays`
    messages: list[MessageCreate] = field(default_factory=list)  # for the change event


@dataclass(slots=True, kw_only=True)
class PendingCreate(Pending):
    values: tuple[Any, ...]  # `rows.session_values`


P = TypeVar("P", bound=Pending)
Runner: TypeAlias = Callable[["Conn", list[P]], Awaitable[Sequence["asyncpg.Record | None"]]]


class GroupCommit(Generic[P]):
    """A queue of changes and the task that drains it into batch statements run by `run`."""

    def __init__(
        self,
        run: Runner[P],
        *,
        connection: Callable[[], AbstractAsyncContextManager[Conn]],
        observer: StoreObserver,
        name: str,
    ) -> None:
        self._run_batch = run
        self._connection = connection
        self._observer = observer
        self._name = name
        self._queue: deque[P] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def submit(self, change: P) -> Outcome:
        """Queue `change` and wait for its outcome."""
        if self._closed:
            raise StorageUnavailable("the store is closing")
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name=self._name)
        self._queue.append(change)
        self._wakeup.set()
        return await change.done

    async def aclose(self) -> None:
        """Finish what is queued, then stop the task."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await asyncio.wait([self._task])  # its failure, if any, was its batch's to report

    async def _drain(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._observer.queue_depth(len(self._queue))
            batch = self._take()
            if not batch:
                continue
            try:
                await self._write(batch)
            except BaseException:  # only a bug or a cancelled task gets here: fail the batch
                self._settle(batch, StorageUnavailable("the store failed"))
                raise

    def _take(self) -> list[P]:
        """The next batch: queued changes in order, at most one per session, within the bounds."""
        batch: list[P] = []
        later: list[P] = []
        taken: set[tuple[str, str]] = set()
        weight = 0
        while self._queue:
            change = self._queue.popleft()
            if change.done.done():  # its caller was cancelled while it waited: nobody wants it now
                continue
            if batch and (len(batch) >= MAX_BATCH_CHANGES or weight + change.weight > MAX_BATCH_WEIGHT):
                self._queue.appendleft(change)
                break
            key = (change.tenant, change.session_id)
            if key in taken:
                later.append(change)
                continue
            taken.add(key)
            batch.append(change)
            weight += change.weight
        self._queue.extendleft(reversed(later))
        return batch

    async def _write(self, batch: list[P]) -> None:
        started = time.perf_counter()
        try:
            async with self._connection() as conn:
                outcomes = await self._run_batch(conn, batch)
        except (StorageFull, StorageUnavailable) as exc:
            self._settle(batch, exc)
            return
        except Exception:  # one change may poison the whole statement: each runs alone
            log.debug("PostgreSQL batch of %d failed; its changes run alone", len(batch), exc_info=True)
            self._settle(batch, ALONE)
            return
        finally:
            self._observer.commit(changes=len(batch), seconds=time.perf_counter() - started)
        for change, outcome in zip(batch, outcomes, strict=True):
            if not change.done.done():
                change.done.set_result(outcome)

    @staticmethod
    def _settle(batch: list[P], outcome: RunAlone | BaseException) -> None:
        for change in batch:
            if change.done.done():
                continue
            if isinstance(outcome, BaseException):
                change.done.set_exception(outcome)
            else:
                change.done.set_result(outcome)


def _by_index(found: list[asyncpg.Record], size: int) -> list[asyncpg.Record | None]:
    """Rows carrying `i` (1-based) in batch order; None where the statement answered none."""
    outcomes: list[asyncpg.Record | None] = [None] * size
    for row in found:
        outcomes[row["i"] - 1] = row
    return outcomes


async def run_appends(conn: Conn, batch: list[PendingAppend]) -> list[asyncpg.Record | None]:
    """Run a batch of appends; each outcome is a row as `queries.APPEND_BATCH` answers it."""
    # Even for one append: APPEND would wait for a row lock, and the whole queue with it.
    index: list[int] = []
    order: list[int] = []
    columns: tuple[list[Any], ...] = tuple([] for _ in q.MESSAGE_FIELDS)
    for i, change in enumerate(batch, start=1):
        index += [i] * change.count
        order += range(1, change.count + 1)
        for column, values in zip(columns, change.arrays, strict=True):
            column += values
    async with conn.transaction():
        found = await _append_batch(conn, batch, index, order, columns)
        await record_events(conn, [appended_event(change, row) for change, row in _found(batch, found)])
    return _by_index(found, len(batch))


def appended_event(change: PendingAppend, row: asyncpg.Record) -> ev.EventDraft:
    """The messages.created event of an append that `row` (session columns after it) answered."""
    session = rows.session_from(row)
    first_seq = session.last_seq - len(change.messages) + 1
    added = common.new_messages(change.messages, first_seq=first_seq, now=session.updated_at)
    return ev.messages_event(change.tenant, session, added)


def _found(batch: list[P], found: list[asyncpg.Record]) -> list[tuple[P, asyncpg.Record]]:
    """The changes of a batch that took effect (`found` or `created` true), with their rows."""
    key = "found" if batch and isinstance(batch[0], PendingAppend) else "created"
    return [(batch[row["i"] - 1], row) for row in found if row[key]]


async def _append_batch(
    conn: Conn, batch: list[PendingAppend], index: list[int], order: list[int], columns: tuple[list[Any], ...]
) -> list[asyncpg.Record]:
    return await conn.fetch(
        q.APPEND_BATCH,
        [change.tenant for change in batch],
        [change.session_id for change in batch],
        [change.count for change in batch],
        [change.expected for change in batch],
        utcnow(),
        index,
        order,
        *columns,
    )


async def run_creates(conn: Conn, batch: list[PendingCreate]) -> list[asyncpg.Record | None]:
    """Run a batch of creates; each outcome is a row as `queries.GET_OR_INSERT_SESSION` answers it."""
    async with conn.transaction():
        if len(batch) == 1:
            one = batch[0]
            row = await conn.fetchrow(q.GET_OR_INSERT_SESSION, one.tenant, one.session_id, *one.values)
            if row is not None and row["created"]:
                await record_events(conn, [created_event(one.tenant, row)])
            return [row]
        columns = [list(column) for column in zip(*(change.values for change in batch), strict=True)]
        found = await conn.fetch(
            q.CREATE_BATCH,
            [change.tenant for change in batch],
            [change.session_id for change in batch],
            *columns,
        )
        await record_events(conn, [created_event(change.tenant, row) for change, row in _found(batch, found)])
    return _by_index(found, len(batch))


def created_event(tenant: str, row: asyncpg.Record) -> ev.EventDraft:
    """The session.created event of a row that `created` answered true."""
    return ev.session_event(tenant, rows.session_from(row), ev.SESSION_CREATED)
