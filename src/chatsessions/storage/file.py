"""The embedded default backend: a shared write-ahead log in front of one
append-only log per session.

Layout of the data directory::

    LOCK                    exclusive lock: one process owns the directory
    catalog.json            checkpoint: every session's head and counters, the
                            Idempotency-Keys, and the first WAL segment to replay
    wal/<n>.wal             write-ahead log segments (the durability point)
    s/<xx>/<hash>.log       one append-only log per session; the name is a hash
                            of (tenant, id): it cannot escape the directory and
                            cannot collide on a case-insensitive file system

Write path (group commit): a change takes its session's lock, builds its
records and queues them; one writer thread takes everything queued, appends
each session record to its session log, appends all WAL entries with one
write, and fsyncs the WAL once for the whole batch. Only then are the changes
applied in memory and acknowledged. Session logs are fsynced at checkpoints,
after which the WAL segments they cover are deleted; on start-up the WAL since
the last checkpoint is replayed into the session logs (idempotently, by
version), so a crash loses nothing acknowledged.

The catalog holds every session's head (small) in memory; message offsets are
loaded per session into a bounded LRU on first read and extended
incrementally, so appends never read history and reads never scan it twice.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import gc
import logging
import os
import struct
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import from_json, to_json

from chatsessions.config import FsyncMode, Settings
from chatsessions.errors import (
    MessageNotFound,
    PreconditionFailed,
    SessionExists,
    SessionNotFound,
    StorageCorrupted,
    StorageFailed,
    StorageFull,
    StorageLocked,
    StorageUnavailable,
)
from chatsessions.models import (
    IdempotencyRequest,
    Message,
    MessageCreate,
    MessageQuery,
    Precondition,
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
from chatsessions.storage import records
from chatsessions.storage.common import new_messages, new_session, page_range, to_us
from chatsessions.storage.idempotency import IdempotencyEntry, IdempotencyTable
from chatsessions.storage.locks import KeyedLocks
from chatsessions.storage.readcache import TAIL_MESSAGES, ReadCache, ReadIndex
from chatsessions.storage.records import Kind
from chatsessions.storage.sessionlog import Entry, LogState, head_of, scan_log, session_file_name
from chatsessions.storage.vfs import FileSystem

log = logging.getLogger("chatsessions.file")

WAL_HEAD = struct.Struct("<32sI")  # session file name, length of the session record
COMPACT_MIN_BYTES = 64 * 1024  # a clear rewrites the log as a snapshot past this size
FD_CACHE = 256
_MESSAGES = TypeAdapter(list[Message])


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for building many long-lived objects at once."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def probe_data_dir_lock(data_dir: Path, fs: FileSystem | None = None) -> None:
    """Raise StorageLocked when another process owns `data_dir`."""
    fs = fs or FileSystem()
    if not fs.exists(data_dir):
        return
    fd = _take_lock(fs, data_dir)
    fs.unlock(fd)


def _take_lock(fs: FileSystem, data_dir: Path) -> int:
    path = data_dir / "LOCK"
    try:
        return fs.lock(path)
    except BlockingIOError:
        try:
            owner = fs.read_file(path).decode(errors="replace").strip() or "unknown"
        except OSError:
            owner = "unknown"
        raise StorageLocked(
            f"data directory {str(data_dir)!r} is locked by another chatsessions process (pid {owner}); "
            "one process owns a data directory; run several replicas on the postgres store"
        ) from None


# --- in-memory state ------------------------------------------------------


@dataclass(slots=True, eq=False)
class Op:
    """One change in a group commit."""

    fname: str
    wal: bytes  # framed WAL entry
    record: bytes = b""  # framed session-log record, appended before the WAL write
    size_before: int = 0  # session-log size before `record`, to roll back
    create: bool = False  # the session log is new
    unlink: bool = False  # after the WAL: delete the session log
    snapshot: bytes = b""  # after the WAL: rewrite the session log as this snapshot
    compacted: bool = False  # set by the writer when the snapshot replaced the log
    apply: Callable[[Op], None] = lambda op: None
    future: asyncio.Future[None] | None = None
    entry: Entry | None = None  # set for pipelined appends, with the epoch they were built in
    epoch: int = 0


def wal_entry(fname: str, record: bytes, idempotency: bytes = b"") -> bytes:
    return records.encode_raw(WAL_HEAD.pack(fname.encode(), len(record)) + record + idempotency)


def split_wal_entry(payload: memoryview) -> tuple[str, bytes, bytes]:
    raw_name, length = WAL_HEAD.unpack_from(payload)
    start = WAL_HEAD.size
    return raw_name.decode(), bytes(payload[start : start + length]), bytes(payload[start + length :])


@dataclass(frozen=True, slots=True)
class LogView:
    """A session log as a read sees it: what was durable and applied when the read began."""

    fname: str
    generation: int
    size: int
    last_seq: int


@dataclass(slots=True)
class Checkpoint:
    files: set[str]  # session logs written since the last checkpoint
    dirs: set[str]  # shard directories whose entries changed
    next_segment: int  # first segment to replay after this checkpoint; older ones go


class FileSessionRepository:
    """Append-only logs on the local file system; one process per data directory."""

    def __init__(self, settings: Settings, fs: FileSystem) -> None:
        self._settings = settings
        self._fs = fs
        self._dir = settings.data_dir
        self._sessions_dir = self._dir / "s"
        self._wal_dir = self._dir / "wal"
        self._fsync = settings.fsync is FsyncMode.always
        self._catalog: dict[str, Entry] = {}
        self._by_tenant: dict[str, set[str]] = {}
        self._cache = ReadCache(max_items=settings.cache_sessions, max_bytes=settings.cache_bytes)
        self._locks = KeyedLocks()
        self._idempotency = IdempotencyTable(ttl=settings.idempotency_ttl_seconds)
        self._lock_fd = -1
        # Writer-thread state: touched only inside the writer executor.
        self._wal_fd = -1
        self._wal_segment = 0
        self._wal_size = 0
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._dirty_files: set[str] = set()
        self._dirty_dirs: set[str] = set()
        self._failed: str | None = None
        self._corrupted: set[str] = set()  # found during recovery
        # Event-loop state.
        self._queue: list[Op] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer_task: asyncio.Task[None] | None = None
        self._checkpoint_task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatsessions-wal")

    # --- lifecycle --------------------------------------------------------

    @classmethod
    async def open(cls, settings: Settings, *, fs: FileSystem | None = None) -> FileSessionRepository:
        repo = cls(settings, fs or FileSystem())
        started = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(repo._executor, repo._recover)
        except BaseException:
            repo._executor.shutdown(wait=False)
            raise
        repo._writer_task = asyncio.create_task(repo._writer_loop(), name="chatsessions-wal-writer")
        log.info(
            "file store open: %s, %d sessions, recovered in %.3f s, fsync=%s",
            settings.data_dir,
            len(repo._catalog),
            time.perf_counter() - started,
            settings.fsync.value,
        )
        return repo

    async def aclose(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._wakeup.set()
        if self._writer_task is not None:
            await self._writer_task
        if self._checkpoint_task is not None:
            await self._checkpoint_task
        loop = asyncio.get_running_loop()
        try:
            if self._failed is None:
                plan = await loop.run_in_executor(self._executor, self._rotate)
                await loop.run_in_executor(self._executor, self._checkpoint, plan, self._catalog_rows(clean=True))
                await loop.run_in_executor(self._executor, self._mark_stopped)
        finally:
            await loop.run_in_executor(self._executor, self._close_files)
            self._executor.shutdown(wait=True)

    def _mark_stopped(self) -> None:
        """A clean stop: the next start trusts the catalog without re-checking the logs."""
        self._fs.unlink(self._dir / "RUNNING")
        self._fs.fsync_dir(self._dir)

    def _close_files(self) -> None:
        for fd in self._fds.values():
            self._fs.close(fd)
        self._fds.clear()
        if self._wal_fd >= 0:
            self._fs.close(self._wal_fd)
            self._wal_fd = -1
        if self._lock_fd >= 0:
            self._fs.unlock(self._lock_fd)
            self._lock_fd = -1

    # --- recovery (writer thread, before serving) ---------------------------

    def _recover(self) -> None:
        fs = self._fs
        fs.mkdir(self._dir)
        self._lock_fd = _take_lock(fs, self._dir)
        fs.truncate(self._lock_fd, 0)
        self._fs.write(self._lock_fd, str(os.getpid()).encode())
        fs.mkdir(self._sessions_dir)
        fs.mkdir(self._wal_dir)
        first_segment, clean = self._load_catalog()
        running = self._dir / "RUNNING"
        if fs.exists(running):
            clean = False  # the last process did not stop cleanly
            self._remove_temp_files()  # only a crash mid-compaction or mid-checkpoint leaves them
        else:
            fs.close(fs.open(running, os.O_WRONLY | os.O_CREAT))
            fs.fsync_dir(self._dir)
        segments = sorted(int(name.split(".")[0]) for name in fs.listdir(self._wal_dir) if name.endswith(".wal"))
        replayed = [n for n in segments if n >= first_segment]
        touched: dict[str, LogState | None] = {}
        for i, number in enumerate(replayed):
            self._replay_segment(number, last=i == len(replayed) - 1, touched=touched)
        for fname, state in touched.items():
            if fname in self._corrupted:
                if fname in self._catalog:
                    self._catalog[fname].corrupted = True
                continue
            self._forget(fname)
            if state is not None:
                self._remember(state.entry(fname))
        # Logs re-read after a crash may hold records no fsync covered yet: the checkpoint below
        # makes them durable before anything is appended after them.
        reread = self._reconcile(skip=touched.keys()) if not clean else set()
        self._wal_segment = (segments[-1] if segments else 0) + 1
        self._open_segment()
        if touched or reread or not clean:
            plan = Checkpoint(set(touched) | reread, {f[:2] for f in [*touched, *reread]}, self._wal_segment)
            self._checkpoint(plan, self._catalog_rows(clean=False))

    def _remove_temp_files(self) -> None:
        for directory in [self._dir, *[self._sessions_dir / d for d in self._fs.listdir(self._sessions_dir)]]:
            for name in self._fs.listdir(directory):
                if name.endswith(".tmp"):
                    self._fs.unlink(directory / name)

    def _load_catalog(self) -> tuple[int, bool]:
        """Load the last checkpoint: (first WAL segment to replay, whether it was a clean shutdown)."""
        path = self._dir / "catalog.json"
        if not self._fs.exists(path):
            self._rebuild_catalog()
            return 0, True
        with gc_paused():  # every object built here lives on: collecting meanwhile only rescans them
            data = from_json(self._fs.read_file(path))
            for row in data["sessions"]:
                self._remember(Entry.from_row(row))
        for tenant, key, fingerprint, response, expires_at in data["idempotency"]:
            self._idempotency.restore(
                tenant, key, IdempotencyEntry(fingerprint, StoredResponse.from_json(response), expires_at)
            )
        return int(data["wal_segment"]), bool(data.get("clean", False))

    def _reconcile(self, *, skip: Any) -> set[str]:
        """After a crash: a session log may hold records written just before the
        crash whose WAL entry never landed (never acknowledged). Re-read every
        log whose size disagrees with the checkpoint; return the logs re-read."""
        reread: set[str] = set()
        for fname, entry in list(self._catalog.items()):
            if fname in skip or self._fs.stat_size(self._path(fname)) == entry.size:
                continue
            self._forget(fname)
            try:
                state = self._read_state(fname)
            except records.Corrupted:
                entry.corrupted = True
                self._remember(entry)
                continue
            if state is not None:
                self._remember(state.entry(fname))
                reread.add(fname)
        return reread

    def _rebuild_catalog(self) -> None:
        """No checkpoint yet (or it was lost): read every session log once."""
        for shard in self._fs.listdir(self._sessions_dir):
            for name in self._fs.listdir(self._sessions_dir / shard):
                if name.endswith(".log"):
                    fname = name[:-4]
                    state = self._read_state(fname)
                    if state is not None:
                        self._remember(state.entry(fname))

    def _read_state(self, fname: str) -> LogState | None:
        """Scan a session log, cutting a torn tail off for good. None if absent or empty."""
        path = self._path(fname)
        if not self._fs.exists(path):
            return None
        try:
            state = scan_log(self._fs.read_file(path))
        except records.Corrupted as exc:
            log.error("session log %s is corrupt at byte %d; it is quarantined", path, exc.offset)
            raise
        if state is not None and state.valid_end < state.total:
            log.warning("session log %s: torn tail of %d bytes cut off", path, state.total - state.valid_end)
            fd = self._fs.open(path, os.O_WRONLY)
            try:
                self._fs.truncate(fd, state.valid_end)
            finally:
                self._fs.close(fd)
        return state

    def _replay_segment(self, number: int, *, last: bool, touched: dict[str, LogState | None]) -> None:
        path = self._segment_path(number)
        data = self._fs.read_file(path)
        try:
            frames, valid_end = records.scan_raw(data)
        except records.Corrupted as exc:
            raise StorageCorrupted(
                f"write-ahead log {path} is corrupt at byte {exc.offset}; refusing to start"
            ) from exc
        if valid_end < len(data):
            if not last:
                raise StorageCorrupted(f"write-ahead log {path} ends early; refusing to start")
            log.warning("write-ahead log %s: torn tail of %d bytes cut off", path, len(data) - valid_end)
            fd = self._fs.open(path, os.O_WRONLY)
            try:
                self._fs.truncate(fd, valid_end)
            finally:
                self._fs.close(fd)
        for _, payload in frames:
            fname, record, idempotency = split_wal_entry(payload)
            self._replay_record(fname, record, touched)
            if idempotency:
                tenant, key, fingerprint, response, expires_at = from_json(idempotency)
                self._idempotency.restore(
                    tenant, key, IdempotencyEntry(fingerprint, StoredResponse.from_json(response), expires_at)
                )

    def _replay_record(self, fname: str, record: bytes, touched: dict[str, LogState | None]) -> None:
        if fname not in touched:
            try:
                touched[fname] = self._read_state(fname)
            except records.Corrupted:
                self._corrupted.add(fname)
        if fname in self._corrupted:
            return
        state = touched[fname]
        (rec,), _ = records.decode(record)
        if rec.kind is Kind.DELETED:
            if self._fs.exists(self._path(fname)):
                self._fs.unlink(self._path(fname))
            touched[fname] = None
            return
        if state is not None and rec.version <= state.version:
            return  # already in the session log
        if rec.kind is Kind.CREATED and state is None:
            self._fs.mkdir(self._path(fname).parent)
            fd = self._fs.open(self._path(fname), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        elif (
            state is not None
            and rec.version == state.version + 1
            # Messages whose seq does not continue the log belong to an earlier incarnation of
            # the id (deleted and re-created since): the DELETED later in the WAL drops them.
            and (rec.kind is not Kind.MESSAGES or rec.seq == state.last_seq + 1)
        ):
            fd = self._fs.open(self._path(fname), os.O_WRONLY | os.O_APPEND)
        else:
            log.info("write-ahead log entry for %s belongs to an earlier incarnation of the session; skipped", fname)
            return
        try:
            self._fs.write(fd, record)
        finally:
            self._fs.close(fd)
        touched[fname] = self._read_state(fname)

    # --- paths and catalog --------------------------------------------------

    def _path(self, fname: str) -> Path:
        return self._sessions_dir / fname[:2] / f"{fname}.log"

    def _segment_path(self, number: int) -> Path:
        return self._wal_dir / f"{number:012d}.wal"

    def _remember(self, entry: Entry) -> None:
        self._catalog[entry.fname] = entry
        self._by_tenant.setdefault(entry.tenant, set()).add(entry.fname)

    def _forget(self, fname: str) -> None:
        entry = self._catalog.pop(fname, None)
        self._cache.drop(fname)
        if entry is not None:
            names = self._by_tenant.get(entry.tenant)
            if names is not None:
                names.discard(fname)
                if not names:
                    del self._by_tenant[entry.tenant]

    def _catalog_rows(self, *, clean: bool) -> dict[str, Any]:
        return {
            "clean": clean,
            "sessions": [entry.to_row() for entry in list(self._catalog.values())],
            "idempotency": [
                [tenant, key, entry.fingerprint, entry.response.to_json() if entry.response else None, entry.expires_at]
                for tenant, key, entry in self._idempotency.completed()
            ],
        }

    # --- writer thread ----------------------------------------------------

    def _open_segment(self) -> None:
        path = self._segment_path(self._wal_segment)
        fd = self._fs.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            self._fs.fsync_dir(self._wal_dir)
            self._wal_size = self._fs.size(fd)
        except OSError:
            self._fs.close(fd)
            raise
        self._wal_fd = fd

    def _session_fd(self, fname: str, *, create: bool) -> int:
        fd = self._fds.get(fname)
        if fd is not None and not create:
            self._fds.move_to_end(fname)
            return fd
        if fd is not None:
            self._fs.close(self._fds.pop(fname))
        flags = os.O_WRONLY | os.O_APPEND
        if create:
            self._fs.mkdir(self._path(fname).parent)
            flags |= os.O_CREAT | os.O_TRUNC
            self._dirty_dirs.add(fname[:2])
        fd = self._fs.open(self._path(fname), flags)
        self._fds[fname] = fd
        if len(self._fds) > FD_CACHE:
            _, old = self._fds.popitem(last=False)
            self._fs.close(old)
        return fd

    def _drop_fd(self, fname: str) -> None:
        fd = self._fds.pop(fname, None)
        if fd is not None:
            self._fs.close(fd)

    def _commit(self, batch: list[Op]) -> None:
        """Write one batch: session records, then the WAL, one fsync. All or nothing."""
        if self._failed is not None:
            raise StorageFailed(self._failed)
        written: list[Op] = []
        wal_before = self._wal_size
        try:
            for op in batch:
                if op.record:
                    written.append(op)
                    self._fs.write(self._session_fd(op.fname, create=op.create), op.record)
            self._fs.write(self._wal_fd, b"".join(op.wal for op in batch))
        except OSError as exc:
            self._roll_back(written, wal_before)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull() from exc
            raise StorageUnavailable(f"write failed: {exc.strerror}; nothing was written") from exc
        self._wal_size += sum(len(op.wal) for op in batch)
        if self._fsync:
            try:
                self._fs.fsync(self._wal_fd)
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the dirty pages:
                # retrying could "succeed" without the data. Stop, as PostgreSQL does.
                self._failed = f"fsync of the write-ahead log failed ({exc.strerror}); restart to recover"
                log.critical(self._failed)
                raise StorageFailed(self._failed) from exc
        for op in batch:
            self._dirty_files.add(op.fname)
            if op.unlink:
                self._dirty_dirs.add(op.fname[:2])
                # The delete is durable in the WAL: failing the batch now would leave the
                # other changes in it on disk but not in memory.
                try:
                    self._drop_fd(op.fname)
                    self._fs.unlink(self._path(op.fname))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("could not remove the log of a deleted session (%s); it is left unused", exc)
            elif op.snapshot:
                op.compacted = self._compact(op.fname, op.snapshot)

    def _roll_back(self, written: list[Op], wal_before: int) -> None:
        try:
            # Newest first: several appends to one session may share the batch.
            for op in reversed(written):
                if op.create:
                    self._drop_fd(op.fname)
                    self._fs.unlink(self._path(op.fname))
                else:
                    self._fs.truncate(self._session_fd(op.fname, create=False), op.size_before)
            self._fs.truncate(self._wal_fd, wal_before)
        except OSError as exc:
            self._failed = f"could not roll back a failed write ({exc.strerror}); restart to recover"
            log.critical(self._failed)

    def _compact(self, fname: str, snapshot: bytes) -> bool:
        """Rewrite a session log as one snapshot: temp file, fsync, rename, fsync dir."""
        path = self._path(fname)
        temp = path.with_name(path.name + ".tmp")
        try:
            fd = self._fs.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                self._fs.write(fd, snapshot)
                self._fs.fsync(fd)
            finally:
                self._fs.close(fd)
            self._drop_fd(fname)
            self._fs.rename(temp, path)
            self._fs.fsync_dir(path.parent)
        except OSError as exc:
            log.warning("compaction of %s failed (%s); the log stays as it was", path, exc.strerror)
            with contextlib.suppress(OSError):
                self._fs.unlink(temp)
            return False
        return True

    def _rotate(self) -> Checkpoint:
        """Start a new WAL segment; what the old ones cover must reach the session logs."""
        old_fd = self._wal_fd
        self._wal_segment += 1
        try:
            self._open_segment()
        except OSError:
            self._wal_segment -= 1
            self._wal_fd = old_fd
            raise
        if old_fd >= 0:
            self._fs.close(old_fd)
        files, dirs = self._dirty_files, self._dirty_dirs
        self._dirty_files, self._dirty_dirs = set(), set()
        return Checkpoint(files, dirs, self._wal_segment)

    def _checkpoint(self, plan: Checkpoint, rows: dict[str, Any]) -> None:
        """Make the session logs durable, then the catalog, then drop covered WAL segments."""
        fs = self._fs
        try:
            for fname in plan.files:
                try:
                    fd = fs.open(self._path(fname), os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    fs.fsync(fd)
                finally:
                    fs.close(fd)
            for shard in plan.dirs:
                if fs.exists(self._sessions_dir / shard):
                    fs.fsync_dir(self._sessions_dir / shard)
            fs.fsync_dir(self._sessions_dir)
        except OSError as exc:
            # These files are no longer in the dirty sets, and a retried fsync may "succeed"
            # without the lost pages: a later checkpoint would drop the WAL that still holds
            # them. Stop writing, as after a failed WAL fsync; recovery replays the WAL.
            self._failed = f"fsync of the session logs failed at a checkpoint ({exc.strerror}); restart to recover"
            log.critical(self._failed)
            raise
        rows["wal_segment"] = plan.next_segment
        path = self._dir / "catalog.json"
        temp = self._dir / "catalog.json.tmp"
        fd = fs.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            fs.write(fd, to_json(rows))
            fs.fsync(fd)
        finally:
            fs.close(fd)
        fs.rename(temp, path)
        fs.fsync_dir(self._dir)
        for name in fs.listdir(self._wal_dir):
            if name.endswith(".wal") and int(name.split(".")[0]) < plan.next_segment:
                fs.unlink(self._wal_dir / name)
        fs.fsync_dir(self._wal_dir)

    # --- event loop side of the writer -------------------------------------

    async def _writer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                fenced = [op for op in batch if op.entry is not None and op.epoch != op.entry.epoch]
                if fenced:
                    stale = StorageUnavailable("an earlier append to this session failed; nothing was written")
                    for op in fenced:
                        assert op.future is not None
                        op.future.set_exception(stale)
                    batch = [op for op in batch if op not in fenced]
                    if not batch:
                        continue
                try:
                    await loop.run_in_executor(self._executor, self._commit, batch)
                except Exception as exc:
                    if not isinstance(exc, StorageUnavailable | StorageFull):
                        log.exception("write failed unexpectedly")
                        exc = StorageUnavailable(f"write failed: {exc}")
                    for op in batch:
                        if op.entry is not None:
                            op.entry.epoch += 1
                            op.entry.settle()
                        assert op.future is not None
                        if not op.future.done():
                            op.future.set_exception(exc)
                    continue
                for op in batch:
                    op.apply(op)
                    assert op.future is not None
                    if not op.future.done():
                        op.future.set_result(None)
                if self._wal_size >= self._settings.wal_segment_bytes and self._checkpoint_task is None:
                    try:
                        plan = await loop.run_in_executor(self._executor, self._rotate)
                    except OSError as exc:
                        log.error("could not start a new write-ahead log segment (%s); will retry", exc)
                    else:
                        self._checkpoint_task = asyncio.create_task(self._run_checkpoint(plan))
            if self._closing and not self._queue:
                return

    async def _run_checkpoint(self, plan: Checkpoint) -> None:
        try:
            rows = self._catalog_rows(clean=False)
            await asyncio.to_thread(self._checkpoint, plan, rows)
        except OSError as exc:
            log.error("checkpoint failed (%s); the write-ahead log is kept and replayed on start-up", exc)
        finally:
            self._checkpoint_task = None

    def _enqueue(self, op: Op) -> asyncio.Future[None]:
        if self._closing:
            raise StorageUnavailable("the store is shutting down")
        if self._failed is not None:
            raise StorageFailed(self._failed)
        op.future = asyncio.get_running_loop().create_future()
        self._queue.append(op)
        self._wakeup.set()
        return op.future

    async def _submit(self, op: Op) -> None:
        """Queue a change and wait until it is durable and applied."""
        await self._enqueue(op)

    # --- helpers on the event loop ------------------------------------------

    def _entry(self, tenant: str, session_id: str) -> Entry | None:
        entry = self._catalog.get(session_file_name(tenant, session_id))
        if entry is None or entry.tenant != tenant or entry.id != session_id:
            return None
        if entry.corrupted:
            raise StorageCorrupted(f"session {session_id!r} failed its checksum; it is quarantined")
        return entry

    def _entry_or_raise(self, tenant: str, session_id: str, if_match: Precondition | None = None) -> Entry:
        """The entry, checked against the version its latest accepted change will have."""
        entry = self._entry(tenant, session_id)
        if entry is None:
            raise SessionNotFound(session_id)
        if if_match is not None and not if_match.holds(entry.r_version):
            raise PreconditionFailed(session_id, entry.r_version)
        return entry

    async def _settled_entry(self, tenant: str, session_id: str, if_match: Precondition | None = None) -> Entry:
        """The entry once its queued appends are durable; for changes that are not
        appends (the caller holds the session lock, so nothing new gets queued)."""
        entry = self._entry(tenant, session_id)
        if entry is not None and entry.pending is not None and not entry.pending.done():
            await asyncio.wait([entry.pending])
        return self._entry_or_raise(tenant, session_id, if_match)

    def _finish_idempotency(
        self, tenant: str, idempotency: IdempotencyRequest | None, answer: StoredResponse | None
    ) -> None:
        if idempotency is not None and answer is not None:
            self._idempotency.finish(tenant, idempotency.key, answer, fingerprint=idempotency.fingerprint)

    async def _create(self, tenant: str, session: Session, *, idempotency: IdempotencyRequest | None = None) -> None:
        fname = session_file_name(tenant, session.id)
        head = head_of(session)
        updated_us = to_us(session.updated_at)
        body = to_json({"tenant": tenant, "head": from_json(head)})
        record = records.encode(Kind.CREATED, version=1, seq=0, updated_us=updated_us, body=body)
        answer = idempotency.render(session, []) if idempotency else None
        idem = self._idempotency_entry(tenant, idempotency, answer)

        def apply(op: Op) -> None:
            self._forget(fname)
            self._remember(
                Entry.from_head(
                    fname=fname,
                    tenant=tenant,
                    head=head,
                    version=1,
                    last_seq=0,
                    first_live=1,
                    updated_us=updated_us,
                    size=len(record),
                    session_id=session.id,
                )
            )
            self._finish_idempotency(tenant, idempotency, answer)

        await self._submit(Op(fname, wal_entry(fname, record, idem), record=record, create=True, apply=apply))

    def _idempotency_entry(
        self, tenant: str, idempotency: IdempotencyRequest | None, answer: StoredResponse | None
    ) -> bytes:
        if idempotency is None or answer is None:
            return b""
        expires_at = time.time() + self._settings.idempotency_ttl_seconds
        return to_json([tenant, idempotency.key, idempotency.fingerprint, answer.to_json(), expires_at])

    # --- the protocol -------------------------------------------------------

    async def create_session(
        self, tenant: str, data: SessionCreate, *, idempotency: IdempotencyRequest | None = None
    ) -> Session:
        session = new_session(data, now=utcnow())
        async with self._locks.hold(session_file_name(tenant, session.id)):
            if self._entry(tenant, session.id) is not None:
                raise SessionExists(session.id)
            await self._create(tenant, session, idempotency=idempotency)
        return session

    async def get_or_create_session(self, tenant: str, session_id: str, data: SessionCreate) -> tuple[Session, bool]:
        async with self._locks.hold(session_file_name(tenant, session_id)):
            entry = self._entry(tenant, session_id)
            if entry is not None:
                return entry.session(), False
            session = new_session(data, session_id=session_id, now=utcnow())
            await self._create(tenant, session)
        return session, True

    async def get_session(self, tenant: str, session_id: str) -> Session | None:
        entry = self._entry(tenant, session_id)
        return entry.session() if entry else None

    async def list_sessions(
        self, tenant: str, *, filters: SessionFilter, limit: int, cursor: SessionCursor | None
    ) -> SessionListing:
        candidates = []
        cursor_key = (-to_us(cursor.updated_at), cursor.id) if cursor else None
        for fname in self._by_tenant.get(tenant, ()):
            entry = self._catalog[fname]
            if entry.corrupted or not filters.matches(
                user_id=entry.user_id, document_id=entry.document_id, section_id=entry.section_id
            ):
                continue
            key = (-entry.updated_us, entry.id)
            if cursor_key is None or key > cursor_key:
                candidates.append((key, entry))
        candidates.sort(key=lambda pair: pair[0])
        page = [entry.session() for _, entry in candidates[:limit]]
        more = len(candidates) > limit
        next_cursor = SessionCursor(page[-1].updated_at, page[-1].id) if more and page else None
        return SessionListing(page, next_cursor)

    async def patch_session(
        self, tenant: str, session_id: str, patch: SessionPatch, *, if_match: Precondition | None = None
    ) -> Session:
        fname = session_file_name(tenant, session_id)
        async with self._locks.hold(fname):
            entry = await self._settled_entry(tenant, session_id, if_match)
            session = patch_session(entry.session(), patch.model_dump(mode="json", exclude_unset=True), now=utcnow())
            head = head_of(session)
            updated_us = to_us(session.updated_at)
            record = records.encode(Kind.PATCHED, version=session.version, updated_us=updated_us, body=head)

            def apply(op: Op) -> None:
                entry.set_head(head)
                entry.version = session.version
                entry.updated_us = updated_us
                entry.size += len(record)
                entry.settle()

            await self._submit(Op(fname, wal_entry(fname, record), record=record, size_before=entry.size, apply=apply))
        return session

    async def delete_session(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> None:
        fname = session_file_name(tenant, session_id)
        async with self._locks.hold(fname):
            entry = await self._settled_entry(tenant, session_id, if_match)
            record = records.encode(Kind.DELETED, version=entry.version + 1)
            await self._submit(Op(fname, wal_entry(fname, record), unlink=True, apply=lambda op: self._forget(fname)))

    async def append_messages(
        self,
        tenant: str,
        session_id: str,
        messages: list[MessageCreate],
        *,
        if_match: Precondition | None = None,
        idempotency: IdempotencyRequest | None = None,
    ) -> tuple[Session, list[Message]]:
        fname = session_file_name(tenant, session_id)
        # The reservation below never awaits, so it needs no lock of its own: it only
        # waits for the changes that hold this session's lock (patch, clear, delete).
        await self._locks.wait_turn(fname)
        entry = self._entry_or_raise(tenant, session_id, if_match)
        now = utcnow()
        updated_us = to_us(now)
        first_seq = entry.r_last_seq + 1
        last_seq = entry.r_last_seq + len(messages)
        version = entry.r_version + 1
        offset = entry.r_size
        added = new_messages(messages, first_seq=first_seq, now=now)
        record = records.encode(
            Kind.MESSAGES,
            version=version,
            seq=first_seq,
            count=len(added),
            updated_us=updated_us,
            body=_MESSAGES.dump_json(added),
        )
        session = entry.session(version=version, last_seq=last_seq, updated_us=updated_us)
        answer = idempotency.render(session, added) if idempotency else None

        def apply(op: Op) -> None:
            entry.version = version
            entry.last_seq = last_seq
            entry.updated_us = updated_us
            entry.size = offset + len(record)
            index = self._cache.get(fname)
            if index is not None and index.generation == entry.generation and index.indexed_size == offset:
                index.offsets.extend([offset] * len(added))
                index.indexed_size = entry.size
                index.remember(added)
                self._cache.put(fname, index)  # re-weigh it
            self._finish_idempotency(tenant, idempotency, answer)

        durable = self._enqueue(
            Op(
                fname,
                wal_entry(fname, record, self._idempotency_entry(tenant, idempotency, answer)),
                record=record,
                size_before=offset,
                apply=apply,
                entry=entry,
                epoch=entry.epoch,
            )
        )
        entry.r_version, entry.r_last_seq, entry.r_size = version, last_seq, offset + len(record)
        entry.pending = durable
        # The next append to this session can join the same group commit.
        await durable
        return session, added

    async def clear_messages(self, tenant: str, session_id: str, *, if_match: Precondition | None = None) -> Session:
        fname = session_file_name(tenant, session_id)
        async with self._locks.hold(fname):
            entry = await self._settled_entry(tenant, session_id, if_match)
            now = utcnow()
            updated_us = to_us(now)
            version = entry.version + 1
            record = records.encode(Kind.CLEARED, version=version, seq=entry.last_seq, updated_us=updated_us)
            snapshot = b""
            if entry.size + len(record) >= COMPACT_MIN_BYTES:
                body = to_json({"tenant": tenant, "head": from_json(entry.head)})
                snapshot = records.encode(
                    Kind.SNAPSHOT, version=version, seq=entry.last_seq, updated_us=updated_us, body=body
                )
            offset = entry.size

            def apply(op: Op) -> None:
                entry.version = version
                entry.first_live = entry.last_seq + 1
                entry.updated_us = updated_us
                if op.compacted:
                    entry.size = len(snapshot)
                    entry.generation += 1
                else:
                    entry.size = offset + len(record)
                entry.settle()
                self._cache.drop(fname)

            await self._submit(
                Op(
                    fname,
                    wal_entry(fname, record),
                    record=record,
                    size_before=offset,
                    snapshot=snapshot,
                    apply=apply,
                )
            )
            return entry.session()

    async def list_messages(self, tenant: str, session_id: str, query: MessageQuery) -> tuple[list[Message], bool]:
        fname = session_file_name(tenant, session_id)
        async with self._locks.hold(fname):
            entry = self._entry_or_raise(tenant, session_id)
            seqs, more = page_range(query, first_seq=entry.first_live, last_seq=entry.last_seq)
            if not seqs:
                return [], more
            found = await self._read_messages(entry, min(seqs), max(seqs))
        if query.order.value == "desc":
            found.reverse()
        return found, more

    async def get_message(self, tenant: str, session_id: str, seq: int) -> Message:
        fname = session_file_name(tenant, session_id)
        async with self._locks.hold(fname):
            entry = self._entry_or_raise(tenant, session_id)
            if not entry.first_live <= seq <= entry.last_seq:
                raise MessageNotFound(session_id, seq)
            (message,) = await self._read_messages(entry, seq, seq)
        return message

    async def _read_messages(self, entry: Entry, first: int, last: int) -> list[Message]:
        """Messages `first..last` (live, contiguous) in seq order; caller holds the session lock."""
        cached = self._cache.get(entry.fname)
        index = cached or ReadIndex(entry.generation, entry.first_live, array("q"), 0)
        if index.generation != entry.generation or index.first_live != entry.first_live:
            index = ReadIndex(entry.generation, entry.first_live, array("q"), 0)
        if index.indexed_size == entry.size and (recent := index.from_tail(first, last)) is not None:
            self._cache.get(entry.fname)  # a hit keeps it young
            return recent
        # Appends queued before this read took the lock are applied while the thread reads:
        # the thread works on what is durable now, and on an index nobody else extends.
        view = LogView(entry.fname, entry.generation, size=entry.size, last_seq=entry.last_seq)
        self._cache.drop(entry.fname)
        loop = asyncio.get_running_loop()
        try:
            found, index = await loop.run_in_executor(None, self._read_sync, view, index, first, last)
        except records.Corrupted as exc:
            entry.corrupted = True
            raise StorageCorrupted(f"session {entry.id!r} failed its checksum at byte {exc.offset}") from exc
        except OSError as exc:
            raise StorageUnavailable(f"could not read the session log: {exc.strerror}") from exc
        self._cache.put(entry.fname, index)  # indexed up to `view.size`: the next read extends it
        return found

    def _read_sync(self, view: LogView, index: ReadIndex, first: int, last: int) -> tuple[list[Message], ReadIndex]:
        fd = self._fs.open(self._path(view.fname), os.O_RDONLY)
        try:
            if index.indexed_size < view.size:
                index = self._extend_index(fd, view, index)
            start = index.offsets[first - index.first_live]
            # A batch is one record: stop at the first record after the one holding `last`.
            following = bisect.bisect_right(index.offsets, index.offsets[last - index.first_live])
            stop = index.offsets[following] if following < len(index.offsets) else view.size
            data = self._fs.pread(fd, stop - start, start)
        finally:
            self._fs.close(fd)
        recs, end = records.decode(data)
        if end != len(data):
            raise records.Corrupted(start + end)
        found: list[Message] = []
        for rec in recs:
            if rec.kind is Kind.MESSAGES and rec.seq <= last and rec.seq + rec.count > first:
                found.extend(m for m in _MESSAGES.validate_json(bytes(rec.body)) if first <= m.seq <= last)
        if len(found) != last - first + 1:
            raise records.Corrupted(start)
        if last == view.last_seq and index.indexed_size == view.size:
            index.remember(found[-TAIL_MESSAGES:])
        return found, index

    def _extend_index(self, fd: int, view: LogView, index: ReadIndex) -> ReadIndex:
        """Index the log from where the cached index stops to the acknowledged end."""
        if index.indexed_size == 0:
            state = scan_log(self._fs.pread(fd, view.size, 0))
            if state is None or state.valid_end != view.size:
                raise records.Corrupted(state.valid_end if state else 0)
            return ReadIndex(view.generation, state.first_live, state.offsets, view.size)
        data = self._fs.pread(fd, view.size - index.indexed_size, index.indexed_size)
        recs, end = records.decode(data)
        if end != len(data):
            raise records.Corrupted(index.indexed_size + end)
        for rec in recs:
            if rec.kind is Kind.MESSAGES:
                index.offsets.extend([index.indexed_size + rec.offset] * rec.count)
            elif rec.kind is Kind.CLEARED:
                index = ReadIndex(view.generation, rec.seq + 1, array("q"), index.indexed_size)
        index.indexed_size = view.size
        return index

    # --- idempotency and health -------------------------------------------

    async def idempotency_begin(self, tenant: str, key: str, fingerprint: str) -> StoredResponse | None:
        return self._idempotency.begin(tenant, key, fingerprint)

    async def idempotency_finish(self, tenant: str, key: str, response: StoredResponse | None) -> None:
        self._idempotency.finish(tenant, key, response)

    async def check_ready(self) -> None:
        if self._failed is not None:
            raise StorageFailed(self._failed)
        if self._closing:
            raise StorageUnavailable("the store is shutting down")
        if not self._fs.writable(self._dir):
            raise StorageUnavailable(f"data directory {str(self._dir)!r} is not writable")

    # --- introspection for tests and benchmarks -----------------------------

    def stats(self) -> dict[str, int]:
        return {
            "sessions": len(self._catalog),
            "cached": len(self._cache),
            "cached_bytes": self._cache.bytes,
            "locks": len(self._locks),
            "wal_segment": self._wal_segment,
        }


__all__ = ["FileSessionRepository", "probe_data_dir_lock"]
