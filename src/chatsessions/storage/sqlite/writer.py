"""The one writer: a thread that owns the write connection and commits changes in groups.

A change is a function of a `Tx` (the connection inside a transaction, and
the writer's cache of session heads). `Writer.submit` queues it and returns
a future; the thread takes everything queued, runs each change under its own
savepoint inside ONE transaction, commits (one fsync for the whole batch), and
only then resolves the futures, on the event loop, in queue order. So:

- a change is acknowledged only after the commit that holds it returned;
- changes are applied in submission order, which is the order the event
  loop called `submit` in: seqs follow acknowledgement order, and nothing is
  reserved outside the database that a failed commit could leave behind;
- a change that raises is rolled back to its savepoint and fails alone; a
  commit that fails fails exactly the changes of its batch, and the next
  batch starts from the committed state (the cache forgets what it held).

After SQLite reports a failed fsync, the file's state is unknown (the kernel
may have dropped the dirty pages), so the writer refuses every later change
with `StorageFailed` until the process restarts.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future as ThreadFuture
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import apsw

from chatsessions.errors import StorageFailed, StorageFull, StorageUnavailable
from chatsessions.models import Session
from chatsessions.storage.base import StoreObserver

log = logging.getLogger("chatsessions.sqlite")

T = TypeVar("T")
HeadKey = tuple[str, str]  # (tenant, session id)

# A batch stays bounded so one commit never holds the answers of thousands of requests.
MAX_BATCH = 512
# SQLite's extended result codes for a failed sync (sqlite3.h).
_SYNC_FAILURES = {apsw.SQLITE_IOERR_FSYNC, apsw.SQLITE_IOERR_DIR_FSYNC}


@dataclass(frozen=True, slots=True)
class Head:
    """A session's row id and its current state, as the writer last committed it.

    `size` estimates the bytes it holds in memory (its JSON fields and a fixed overhead).
    """

    pk: int
    session: Session
    size: int

    def moved(self, session: Session) -> Head:
        """The same session after a change of its counters only (its size stays)."""
        return Head(self.pk, session, self.size)


class HeadCache:
    """LRU of session heads, bounded in count and in bytes; touched only by the writer thread."""

    def __init__(self, *, max_heads: int, max_bytes: int) -> None:
        self._max_heads = max_heads
        self._max_bytes = max_bytes
        self._bytes = 0
        self._heads: OrderedDict[HeadKey, Head] = OrderedDict()

    def get(self, key: HeadKey) -> Head | None:
        head = self._heads.get(key)
        if head is not None:
            self._heads.move_to_end(key)
        return head

    def put(self, key: HeadKey, head: Head) -> None:
        old = self._heads.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        self._heads[key] = head
        self._bytes += head.size
        while len(self._heads) > self._max_heads or (self._bytes > self._max_bytes and len(self._heads) > 1):
            _, evicted = self._heads.popitem(last=False)
            self._bytes -= evicted.size

    def drop(self, key: HeadKey) -> None:
        old = self._heads.pop(key, None)
        if old is not None:
            self._bytes -= old.size

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._heads)


@dataclass(slots=True)
class Tx:
    """What a change sees: the write connection inside the batch's transaction, and the heads."""

    conn: apsw.Connection
    heads: HeadCache
    touched: list[HeadKey] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)  # recorded by the changes; published after the commit

    def put_head(self, key: HeadKey, head: Head) -> None:
        self.touched.append(key)
        self.heads.put(key, head)

    def drop_head(self, key: HeadKey) -> None:
        self.touched.append(key)
        self.heads.drop(key)


Change = Callable[[Tx], T]


@dataclass(slots=True)
class _Job(Generic[T]):
    change: Change[T]
    future: asyncio.Future[T]
    outside: bool = False  # run on the bare connection, between transactions (a checkpoint)


def translate(exc: apsw.Error, *, failed: Callable[[], None]) -> Exception:
    """The domain error for an SQLite failure of a write."""
    if isinstance(exc, apsw.FullError):
        return StorageFull()
    if isinstance(exc, apsw.IOError) and getattr(exc, "extendedresult", None) in _SYNC_FAILURES:
        failed()
        return StorageFailed("the disk failed to sync; writes are refused until the service restarts")
    if isinstance(exc, apsw.IOError):
        return StorageUnavailable(f"the disk failed a write ({exc}); nothing was written")
    return StorageUnavailable(f"the database failed a write ({type(exc).__name__}: {exc})")


class Writer:
    """The write connection, its thread, and the queue in front of it."""

    def __init__(
        self,
        connect: Callable[[], apsw.Connection],
        *,
        cache_sessions: int,
        cache_bytes: int,
        observer: StoreObserver,
        on_commit: Callable[[list[Any]], None] | None = None,
    ) -> None:
        self._connect = connect
        self._on_commit = on_commit
        self._heads = HeadCache(max_heads=cache_sessions, max_bytes=cache_bytes)
        self._observer = observer
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self, setup: Callable[[apsw.Connection], None]) -> None:
        """Start the thread; it opens the connection and runs `setup` (pragmas, migrations) first.

        Raises whatever `setup` or the connection raised; then no thread is left running.
        """
        self._loop = asyncio.get_running_loop()
        ready: ThreadFuture[None] = ThreadFuture()
        self._thread = threading.Thread(target=self._run, args=(setup, ready), name="chatsessions-writer", daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)

    def submit(self, change: Change[T]) -> asyncio.Future[T]:
        """Queue a change; the future resolves once the transaction holding it committed."""
        assert self._loop is not None, "the writer is not started"
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Job(change, future))
        return future

    def submit_outside(self, work: Callable[[apsw.Connection], T]) -> asyncio.Future[T]:
        """Queue work that must run outside any transaction (a WAL checkpoint), alone, in queue order."""
        assert self._loop is not None, "the writer is not started"
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Job(lambda tx: work(tx.conn), future, outside=True))
        return future

    async def stop(self) -> None:
        """Commit what is queued, then close the connection and end the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def failed(self) -> bool:
        return self._failed

    # --- the thread -----------------------------------------------------------

    def _run(self, setup: Callable[[apsw.Connection], None], ready: ThreadFuture[None]) -> None:
        try:
            conn = self._connect()
            try:
                setup(conn)
            except BaseException:
                conn.close()
                raise
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            self._serve(conn)
        finally:
            try:
                conn.close()
            except apsw.Error as exc:  # its closing checkpoint met a failed disk; the WAL keeps what it covers
                log.warning("closing the database after a disk failure: %s: %s", type(exc).__name__, exc)

    def _serve(self, conn: apsw.Connection) -> None:
        stopping = False
        held: _Job[Any] | None = None  # work outside a transaction met while gathering a batch
        while not stopping:
            first = held if held is not None else self._queue.get()
            held = None
            if first is None:
                break
            batch: list[_Job[Any]] = [first]
            while len(batch) < MAX_BATCH and not first.outside:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                if job.outside:
                    held = job
                    break
                batch.append(job)
            self._observer.queue_depth(self._queue.qsize())
            events: list[Any] = []
            if first.outside:
                outcomes = self._outside(conn, first)
            else:
                outcomes, events = self._commit(conn, batch)
            loop = self._loop
            assert loop is not None
            try:
                loop.call_soon_threadsafe(_deliver, batch, outcomes, events, self._on_commit)
            except RuntimeError:  # the loop is closed: nobody waits for these answers any more
                log.warning("the event loop closed before %d answers could be delivered", len(batch))

    def _mark_failed(self) -> None:
        if not self._failed:
            log.error("an fsync of the database failed: refusing writes until restart")
        self._failed = True

    def _commit(self, conn: apsw.Connection, batch: list[_Job[Any]]) -> tuple[list[tuple[bool, Any]], list[Any]]:
        if self._failed:
            refusal = StorageFailed("an earlier sync of the disk failed; writes are refused until the service restarts")
            return [(False, refusal)] * len(batch), []
        started = time.perf_counter()
        tx = Tx(conn, self._heads)
        outcomes: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                outcomes.append(self._run_one(tx, job))
            conn.execute("COMMIT")
        except apsw.Error as exc:
            error = translate(exc, failed=self._mark_failed)
            log.warning("a commit of %d changes failed: %s: %s", len(batch), type(exc).__name__, exc)
            if not conn.getautocommit():
                try:
                    conn.execute("ROLLBACK")
                except apsw.Error:
                    log.exception("rollback after a failed commit failed")
            for key in tx.touched:
                self._heads.drop(key)
            outcomes = [(False, error)] * len(batch)
            tx.events.clear()
        self._observer.commit(changes=len(batch), seconds=time.perf_counter() - started)
        return outcomes, tx.events

    def _outside(self, conn: apsw.Connection, job: _Job[Any]) -> list[tuple[bool, Any]]:
        try:
            return [(True, job.change(Tx(conn, self._heads)))]
        except apsw.Error as exc:
            return [(False, translate(exc, failed=self._mark_failed))]
        except Exception as exc:
            return [(False, exc)]

    def _run_one(self, tx: Tx, job: _Job[Any]) -> tuple[bool, Any]:
        conn = tx.conn
        mark, events_mark = len(tx.touched), len(tx.events)
        conn.execute("SAVEPOINT change")
        try:
            value = job.change(tx)
        except (apsw.FullError, apsw.IOError, apsw.CorruptError):
            raise  # the disk or the file failed: the whole batch fails (SQLite may have rolled it back)
        except Exception as exc:  # a domain error (or a bug): this change alone is undone
            conn.execute("ROLLBACK TO change; RELEASE change")
            for key in tx.touched[mark:]:
                self._heads.drop(key)
            del tx.events[events_mark:]
            return False, exc
        conn.execute("RELEASE change")
        return True, value


def _deliver(
    batch: list[_Job[Any]],
    outcomes: list[tuple[bool, Any]],
    events: list[Any],
    on_commit: Callable[[list[Any]], None] | None,
) -> None:
    # Events first: a subscriber that reads the change's answer may already see its event.
    if events and on_commit is not None:
        try:
            on_commit(events)
        except Exception:
            log.exception("publishing %d committed events failed", len(events))
    for job, (ok, value) in zip(batch, outcomes, strict=True):
        if job.future.done():  # the caller was cancelled; the change committed all the same
            continue
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)
