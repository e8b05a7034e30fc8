"""A SQLite VFS for tests: injected I/O errors and simulated power loss, the way SQLite tests itself.

`FaultyVFS` is an apsw VFS written in Python that inherits SQLite's default
one: every file operation really happens (the store runs normally on a real
directory), and on the way two things can be done to it.

Faults. `inject()` makes chosen calls fail with the result code SQLite's own
unix VFS would report for an errno: ENOSPC on a write is SQLITE_FULL (half the
data is written first, as a full disk does), EIO on a write
SQLITE_IOERR_WRITE, any failed sync SQLITE_IOERR_FSYNC. A fault matches by
operation, file name suffix, a marker the written data contains, or any
predicate, for the next N calls or for ever.

Power loss. Every write, truncate and sync is recorded per file, as SQLite's
crash tests do (`test6.c`):

- a file's *durable* content is its content as of its last completed sync;
  writes and truncates since then are *pending* and a power cut drops them;
- a file's name (its creation, its deletion) is metadata: it reaches the
  disk at the next completed sync of any file, as a journaling file system
  (ext4, XFS) commits its one ordered metadata journal, or at once when
  SQLite asks for the directory to be synced. Until then a new file does not
  exist on the disk and a deleted one comes back with its durable content.

The mutating calls (xWrite, xSync, xTruncate, xDelete) are numbered from 0.
With `crash_at=n` (or a `crash_when` predicate) call n never happens: it and
every later call of any kind fail with SQLITE_IOERR, the machine is off.
`materialise(target)` then writes the disk image a reboot would find: only
what a completed sync covered, or, given a random generator, that plus a
random subset of the pending writes, some of them torn at a sector boundary
(a disk may have flushed any of its cache before the cut). The live directory
itself is what a kill -9 at that point leaves: the page cache survives.

The wal-index (`-shm`) is shared memory SQLite rebuilds from the WAL after a
crash; it is not part of an image.

One difference from a real disk: apsw re-raises every exception a Python VFS
method raised, even where SQLite itself ignores the failure (an automatic
checkpoint after a commit, closing a connection). So an injected fault there
fails the statement that ran into it, where the unix VFS would fail nothing:
the store under test sees more failures than a real disk gives it, never
fewer.

Use it as a context manager, or call `unregister()`: SQLite's registry of
VFS names is process-wide, so every instance registers under its own name.
"""

from __future__ import annotations

import errno as errnos
import itertools
import os
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import apsw

if TYPE_CHECKING:
    from typing_extensions import Buffer

Op = Literal["write", "sync", "truncate", "delete"]
SECTOR = 512

_names = itertools.count(1)  # only to keep registered names apart; no other state


@dataclass(frozen=True, slots=True)
class Call:
    """One mutating call as the VFS sees it (before it happens)."""

    op: Op
    path: str
    offset: int = 0  # xWrite: where; xTruncate: the new size
    data: bytes = b""  # xWrite only

    def describe(self, root: Path | None) -> str:
        name = _relative(self.path, root) or self.path
        if self.op == "write":
            return f"write {name} {self.offset}+{len(self.data)}"
        if self.op == "truncate":
            return f"truncate {name} {self.offset}"
        return f"{self.op} {name}"


@dataclass(slots=True, eq=False)
class Fault:
    """Fail the calls that match, `times` of them (-1: every one), with what `errno` makes SQLite report."""

    op: Op
    errno: int
    times: int = 1
    suffix: str | None = None  # the file's name ends with it: "-wal", ".db"
    marker: bytes | None = None  # a write whose data contains these bytes
    when: Callable[[Call], bool] | None = None
    hits: int = 0

    def matches(self, call: Call) -> bool:
        if self.times == 0 or call.op != self.op:
            return False
        if self.suffix is not None and not call.path.endswith(self.suffix):
            return False
        if self.marker is not None and self.marker not in call.data:
            return False
        return self.when is None or self.when(call)

    @property
    def code(self) -> int:
        """The (extended) result code SQLite's unix VFS returns for this errno on this operation."""
        if self.op == "write":
            return apsw.SQLITE_FULL if self.errno == errnos.ENOSPC else apsw.SQLITE_IOERR_WRITE
        if self.op == "sync":
            return apsw.SQLITE_IOERR_FSYNC
        if self.op == "truncate":
            return apsw.SQLITE_IOERR_TRUNCATE
        return apsw.SQLITE_IOERR_DELETE


@dataclass(slots=True)
class _Pending:
    """A change not yet covered by a sync: ("write", offset, data), ("truncate", size, b"") or ("create", 0, b"")."""

    kind: Literal["write", "truncate", "create"]
    offset: int = 0
    data: bytes = b""


@dataclass(slots=True)
class _Record:
    durable: bytes | None  # None: the file does not exist on the disk
    pending: list[_Pending] = field(default_factory=list)  # a "create" first: a new file, not yet named on disk
    unlinked: bool = False  # deleted, and the deletion is not on the disk yet


def _apply(content: bytearray, change: _Pending) -> bytearray:
    if change.kind == "create":
        return bytearray()
    if change.kind == "truncate":
        if change.offset < len(content):
            del content[change.offset :]
        else:
            content.extend(bytes(change.offset - len(content)))
        return content
    end = change.offset + len(change.data)
    if len(content) < change.offset:
        content.extend(bytes(change.offset - len(content)))
    content[change.offset : end] = change.data
    return content


def _relative(path: str, root: Path | None) -> str | None:
    if root is None:
        return None
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return None


def _torn(change: _Pending, rng: random.Random) -> _Pending:
    """A write cut at a sector boundary: only its first sectors reached the disk."""
    if change.kind != "write" or len(change.data) <= SECTOR:
        return change
    first_boundary = SECTOR - change.offset % SECTOR
    boundaries = range(first_boundary, len(change.data), SECTOR)
    keep = rng.choice(boundaries)
    return _Pending("write", change.offset, change.data[:keep])


class FaultyVFS(apsw.VFS):
    """SQLite's default VFS, with injected faults and a record of what a power cut would leave.

    Args:
        root: the directory whose files `materialise` writes out (paths are kept relative to it).
        crash_at: the number of the mutating call at which the power goes.
        crash_when: or the first mutating call for which this returns True.
    """

    def __init__(
        self,
        *,
        root: Path | None = None,
        crash_at: int | None = None,
        crash_when: Callable[[Call], bool] | None = None,
    ) -> None:
        self.vfs_name = f"chatsessions-faulty-{os.getpid()}-{next(_names)}"
        self.root = root.resolve() if root is not None else None
        self.crash_at = crash_at
        self.crash_when = crash_when
        self.calls = 0  # mutating calls that happened
        self.trace: list[str] = []
        self.crashed = False
        self.crash_call = ""  # the call that never happened
        self.faults: list[Fault] = []
        self._files: dict[str, _Record] = {}
        self._lock = threading.RLock()
        super().__init__(self.vfs_name, "")

    def __enter__(self) -> FaultyVFS:
        return self

    def __exit__(
        self, etype: type[BaseException] | None, evalue: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unregister()

    # --- faults

    def inject(
        self,
        op: Op,
        errno: int,
        *,
        times: int = 1,
        suffix: str | None = None,
        marker: bytes | None = None,
        when: Callable[[Call], bool] | None = None,
    ) -> Fault:
        """Fail the next `times` calls of `op` that match (-1: all of them) as `errno` would."""
        fault = Fault(op, errno, times, suffix, marker, when)
        with self._lock:
            self.faults.append(fault)
        return fault

    def heal(self) -> None:
        """No more faults: the disk has room again, the controller answers."""
        with self._lock:
            self.faults.clear()

    @contextmanager
    def failing(self, op: Op, errno: int, *, suffix: str | None = None, marker: bytes | None = None) -> Iterator[Fault]:
        """Every matching call fails for the length of a `with` block."""
        fault = self.inject(op, errno, times=-1, suffix=suffix, marker=marker)
        try:
            yield fault
        finally:
            with self._lock:
                self.faults = [other for other in self.faults if other is not fault]

    # --- power loss

    def cut_power(self) -> None:
        """The machine goes off now: every later call fails."""
        with self._lock:
            self.crashed = True
            self.crash_call = self.crash_call or "(cut by the test)"

    def durable_image(self, *, rng: random.Random | None = None) -> dict[str, bytes]:
        """What a reboot would find under `root`: relative path -> content.

        Without `rng`, only what completed syncs covered. With it, each pending
        change independently reached the disk or not, and a write that did may
        be torn at a sector boundary.
        """
        image: dict[str, bytes] = {}
        with self._lock:
            for path, record in self._files.items():
                name = _relative(path, self.root)
                if name is None:
                    continue
                content: bytearray | None = None if record.durable is None else bytearray(record.durable)
                if rng is not None:
                    if record.unlinked and rng.random() < 0.5:
                        content = None
                    for change in record.pending:
                        if rng.random() < 0.5:
                            continue
                        if rng.random() < 0.25:
                            change = _torn(change, rng)
                        content = _apply(bytearray() if content is None else content, change)
                if content is not None:
                    image[name] = bytes(content)
        return image

    def materialise(self, target: Path, *, rng: random.Random | None = None) -> dict[str, bytes]:
        """Write `durable_image(rng=rng)` under `target` (a new directory) and return it."""
        image = self.durable_image(rng=rng)
        target.mkdir(parents=True, exist_ok=True)
        for name, content in image.items():
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        return image

    # --- bookkeeping shared by the file objects

    def _alive(self) -> None:
        if self.crashed:
            raise apsw.exception_for(apsw.SQLITE_IOERR)

    def _enter(self, call: Call) -> None:
        """Number a mutating call, or refuse it; raise the injected fault it matches. Holds the lock."""
        self._alive()
        if (self.crash_at is not None and self.calls >= self.crash_at) or (
            self.crash_when is not None and self.crash_when(call)
        ):
            self.crashed = True
            self.crash_call = call.describe(self.root)
            raise apsw.exception_for(apsw.SQLITE_IOERR)
        self.calls += 1
        self.trace.append(call.describe(self.root))

    def _fault(self, call: Call) -> Fault | None:
        for fault in self.faults:
            if fault.matches(call):
                if fault.times > 0:
                    fault.times -= 1
                fault.hits += 1
                return fault
        return None

    def _opened(self, path: str, *, existed: bool) -> None:
        with self._lock:
            record = self._files.get(path)
            if existed:
                if record is None:  # there before the recording began: on the disk as it is
                    self._files[path] = _Record(Path(path).read_bytes())
                return
            if record is None:
                self._files[path] = _Record(None, [_Pending("create")])
            else:  # a new file under a name whose deletion may not be on the disk yet
                record.pending = [_Pending("create")]

    def _record(self, path: str, change: _Pending) -> None:
        record = self._files.setdefault(path, _Record(None, [_Pending("create")]))
        record.pending.append(change)

    def _deleted(self, path: str, *, syncdir: bool) -> None:
        record = self._files.get(path)
        if record is None:
            return
        record.pending = []
        record.unlinked = True
        if syncdir:
            self._names_durable()

    def _names_durable(self) -> None:
        """The metadata journal commits: every creation and deletion so far is on the disk."""
        for record in self._files.values():
            if record.unlinked:
                record.durable = None
                record.unlinked = False
            if record.pending and record.pending[0].kind == "create":
                record.durable = b""
                del record.pending[0]

    def _synced(self, path: str) -> None:
        self._names_durable()
        record = self._files.get(path)
        if record is None:
            return
        content = bytearray(record.durable or b"")
        for change in record.pending:
            content = _apply(content, change)
        record.durable = bytes(content)
        record.pending = []

    # --- the VFS methods

    def xOpen(self, name: str | apsw.URIFilename | None, flags: list[int]) -> apsw.VFSFile:
        self._alive()
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        existed = path is not None and os.path.exists(path)
        file = FaultyFile(self, name, flags, path)
        if path is not None:
            self._opened(path, existed=existed)
        return file

    def xDelete(self, filename: str, syncdir: bool) -> None:
        with self._lock:
            call = Call("delete", filename)
            self._enter(call)
            fault = self._fault(call)
            if fault is not None:
                raise apsw.exception_for(fault.code)
            super().xDelete(filename, syncdir)
            self._deleted(filename, syncdir=syncdir)

    def xAccess(self, pathname: str, flags: int) -> bool:
        self._alive()
        return super().xAccess(pathname, flags)


class FaultyFile(apsw.VFSFile):
    """One open file of a `FaultyVFS`; `path` is None for SQLite's nameless temporary files."""

    def __init__(self, vfs: FaultyVFS, name: str | apsw.URIFilename | None, flags: list[int], path: str | None) -> None:
        self._vfs = vfs
        self._path = path
        super().__init__("", name, flags)

    def xWrite(self, data: Buffer, offset: int) -> None:
        if self._path is None:
            self._vfs._alive()
            super().xWrite(data, offset)
            return
        payload = bytes(data)
        with self._vfs._lock:
            call = Call("write", self._path, offset, payload)
            self._vfs._enter(call)
            fault = self._vfs._fault(call)
            if fault is not None:
                half = payload[: len(payload) // 2]  # a full disk takes part of a write, then refuses
                if half:
                    super().xWrite(half, offset)
                    self._vfs._record(self._path, _Pending("write", offset, half))
                raise apsw.exception_for(fault.code)
            super().xWrite(payload, offset)
            self._vfs._record(self._path, _Pending("write", offset, payload))

    def xTruncate(self, newsize: int) -> None:
        if self._path is None:
            self._vfs._alive()
            super().xTruncate(newsize)
            return
        with self._vfs._lock:
            call = Call("truncate", self._path, newsize)
            self._vfs._enter(call)
            fault = self._vfs._fault(call)
            if fault is not None:
                raise apsw.exception_for(fault.code)
            super().xTruncate(newsize)
            self._vfs._record(self._path, _Pending("truncate", newsize))

    def xSync(self, flags: int) -> None:
        if self._path is None:
            self._vfs._alive()
            super().xSync(flags)
            return
        with self._vfs._lock:
            call = Call("sync", self._path)
            self._vfs._enter(call)
            fault = self._vfs._fault(call)
            if fault is not None:
                # A failed fsync: what it covered may or may not be on the disk, so it stays pending.
                raise apsw.exception_for(fault.code)
            super().xSync(flags)
            self._vfs._synced(self._path)

    def xRead(self, amount: int, offset: int) -> bytes:
        self._vfs._alive()
        return super().xRead(amount, offset)

    def xFileSize(self) -> int:
        self._vfs._alive()
        return super().xFileSize()
