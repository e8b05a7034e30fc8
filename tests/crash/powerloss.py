"""Power-loss simulation at the file store's single OS-call layer, the way SQLite tests its commits.

`RecordingFileSystem` performs every call on a real directory (so the store
runs normally) and keeps a model of what a power cut would leave:

- each file has its data (the page cache) and its durable data: the data as
  of its last completed fsync. A write not followed by an fsync of its file is
  dropped.
- each directory has its entries and its durable entries: the entries as of
  its last fsync. A creation, rename or unlink not followed by an fsync of
  its directory is dropped: a dropped creation means the file does not exist,
  a dropped rename leaves the old name (and its contents) in place, a dropped
  unlink brings the file back with its durable data.

Every mutating call (write, truncate, fsync, fsync of a directory, rename,
unlink, creation of a file or directory) gets a number. With `crash_at=n`,
call `n` and every call after it raise `PowerCut`: the machine is off, the
writer stops there, and what was acknowledged before must survive in the
durable image (`materialize`). The live directory at that moment is what a
kill -9 leaves (the page cache survives), so each crash point checks both.

`SCRIPT` is a short workload (create, appends, a batch, patch, clear with
compaction, delete and re-create of an id, a checkpoint forced by small WAL
segments, a kill -9 in the middle of an append followed by a restart). It is
run once per crash point in `make test` and at random points, with torn
unsynced tails, in `make crash` (`python -m tests.crash.powerloss`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from chatsessions.config import Settings
from chatsessions.errors import ChatSessionsError
from chatsessions.models import MessageCreate, MessageQuery, Role, SessionCreate, SessionPatch
from chatsessions.storage.file import FileSessionRepository
from chatsessions.storage.vfs import FileSystem

TENANT = "default"
WAL_SEGMENT_BYTES = 32 * 1024  # the big batch in SCRIPT crosses it: one checkpoint mid-script
STEP_TIMEOUT = 5.0


class PowerCut(OSError):
    """The machine lost power (or the process was killed): no further call reaches the disk."""

    def __init__(self) -> None:
        super().__init__(5, "simulated power cut")  # EIO


# --- the recording file system ----------------------------------------------


@dataclass(eq=False)
class Inode:
    data: bytearray = field(default_factory=bytearray)  # the page cache
    durable: bytes = b""  # the disk: the data as of the last completed fsync


@dataclass(eq=False)
class Directory:
    entries: dict[str, Inode | Directory] = field(default_factory=dict)
    durable: dict[str, Inode | Directory] = field(default_factory=dict)


@dataclass(slots=True)
class Handle:
    inode: Inode
    path: Path
    append: bool
    position: int = 0


class RecordingFileSystem(FileSystem):
    """Real calls on `root` plus a model of the durable state; see the module docstring."""

    def __init__(self, root: Path, *, crash_at: int | None = None) -> None:
        self.root = root
        self.tree = Directory()
        self.calls = 0
        self.crash_at = crash_at
        self.dead = False  # the process is gone: every call fails
        self.power_cut = False  # ... and so is the page cache: only the durable image counts
        self.crash_call = ""  # the call that never happened
        self.trace: list[str] = []
        self.kill_when: Callable[[str, Path], bool] | None = None
        self._handles: dict[int, Handle] = {}
        self._lock = threading.RLock()
        root.mkdir(parents=True, exist_ok=True)

    # --- bookkeeping

    def _record(self, what: str, path: Path) -> None:
        """Number one mutating call, or refuse it: at the crash point the machine is off."""
        self._check_alive()
        if self.crash_at is not None and self.calls >= self.crash_at:
            self.power_cut = True
            self._die(what, path)
        if self.kill_when is not None and self.kill_when(what, path):
            self.kill_when = None
            self._die(what, path)
        self.trace.append(f"{what} {self._rel(path)}")
        self.calls += 1

    def _die(self, what: str, path: Path) -> None:
        self.dead = True
        self.crash_call = f"{what} {self._rel(path)}"
        raise PowerCut()

    def _check_alive(self) -> None:
        if self.dead:
            raise PowerCut()

    def revive(self) -> None:
        """After a kill -9 (not a power cut): a new process on the same disk and page cache."""
        with self._lock:
            assert not self.power_cut
            self.dead = False
            self._handles.clear()

    def path_of(self, fd: int) -> Path:
        """The path `fd` was opened with."""
        return self._handles[fd].path

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.root)) if path != self.root else "."

    def _dir(self, path: Path) -> Directory:
        node: Inode | Directory = self.tree
        for part in path.relative_to(self.root).parts:
            if not isinstance(node, Directory) or part not in node.entries:
                raise FileNotFoundError(2, "No such file or directory", str(path))
            node = node.entries[part]
        if not isinstance(node, Directory):
            raise NotADirectoryError(20, "Not a directory", str(path))
        return node

    # --- calls that change the disk

    def open(self, path: Path, flags: int, mode: int = 0o644) -> int:
        with self._lock:
            parent = self._dir(path.parent)
            creates = bool(flags & os.O_CREAT) and path.name not in parent.entries
            truncates = bool(flags & os.O_TRUNC) and (flags & os.O_ACCMODE) != os.O_RDONLY
            if creates or truncates:
                self._record("create" if creates else "truncate-open", path)
            else:
                self._check_alive()
            fd = super().open(path, flags, mode)
            node = parent.entries.setdefault(path.name, Inode())
            assert isinstance(node, Inode), path
            if truncates:
                node.data = bytearray()
            self._handles[fd] = Handle(node, path, bool(flags & os.O_APPEND))
            return fd

    def close(self, fd: int) -> None:
        # Closing never reaches the disk; it always runs so a dead store releases its files.
        with self._lock:
            if self._handles.pop(fd, None) is not None:
                super().close(fd)

    def write(self, fd: int, data: bytes) -> None:
        with self._lock:
            handle = self._handles[fd]
            self._record("write", handle.path)
            super().write(fd, data)
            inode = handle.inode
            start = len(inode.data) if handle.append else handle.position
            if start > len(inode.data):
                inode.data.extend(bytes(start - len(inode.data)))
            inode.data[start : start + len(data)] = data
            handle.position = start + len(data)

    def truncate(self, fd: int, size: int) -> None:
        with self._lock:
            self._record("truncate", self._handles[fd].path)
            super().truncate(fd, size)
            inode = self._handles[fd].inode
            del inode.data[size:]
            inode.data.extend(bytes(size - len(inode.data)))

    def fsync(self, fd: int) -> None:
        with self._lock:
            self._record("fsync", self._handles[fd].path)
            inode = self._handles[fd].inode
            inode.durable = bytes(inode.data)  # the real fsync is skipped: the model is the disk

    def fsync_dir(self, path: Path) -> None:
        with self._lock:
            self._record("fsync-dir", path)
            directory = self._dir(path)
            directory.durable = dict(directory.entries)

    def rename(self, src: Path, dst: Path) -> None:
        with self._lock:
            self._record("rename", src)
            super().rename(src, dst)
            self._dir(dst.parent).entries[dst.name] = self._dir(src.parent).entries.pop(src.name)

    def unlink(self, path: Path) -> None:
        with self._lock:
            self._record("unlink", path)
            super().unlink(path)
            del self._dir(path.parent).entries[path.name]

    def mkdir(self, path: Path) -> None:
        with self._lock:
            node = self.tree
            current = self.root
            for part in path.relative_to(self.root).parts:
                current = current / part
                child = node.entries.get(part)
                if child is None:
                    self._record("mkdir", current)
                    os.mkdir(current)
                    child = node.entries[part] = Directory()
                assert isinstance(child, Directory)
                node = child

    # --- calls that only read: refused once dead

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self._check_alive()
        return super().pread(fd, size, offset)

    def size(self, fd: int) -> int:
        self._check_alive()
        return super().size(fd)

    def listdir(self, path: Path) -> list[str]:
        self._check_alive()
        return super().listdir(path)

    def stat_size(self, path: Path) -> int | None:
        self._check_alive()
        return super().stat_size(path)

    def exists(self, path: Path) -> bool:
        self._check_alive()
        return super().exists(path)

    def unlock(self, fd: int) -> None:
        with self._lock:
            if self._handles.pop(fd, None) is not None:
                super().unlock(fd)

    # --- images

    def materialize(self, target: Path, *, torn: random.Random | None = None) -> None:
        """Write what the disk holds after a power cut now into `target`.

        With `torn`, each file also keeps a random prefix of what was appended
        since its last fsync (a torn, partly flushed tail) instead of none of it.
        """
        with self._lock:
            _materialize(self.tree, target, torn)


def _materialize(directory: Directory, target: Path, torn: random.Random | None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name, node in directory.durable.items():
        if isinstance(node, Directory):
            _materialize(node, target / name, torn)
            continue
        data = node.durable
        if torn is not None and bytes(node.data[: len(data)]) == data and len(node.data) > len(data):
            data = bytes(node.data[: len(data) + torn.randint(0, len(node.data) - len(data))])
        (target / name).write_bytes(data)


# --- the scripted workload and what a client may expect -------------------


@dataclass(frozen=True, slots=True)
class Step:
    kind: str  # create, append, patch, clear, delete, kill (the next step dies at its WAL write)
    sid: str = ""
    contents: tuple[str, ...] = ()
    title: str | None = None


@dataclass(frozen=True, slots=True)
class SessionState:
    version: int
    last_seq: int
    title: str | None
    messages: tuple[tuple[int, str], ...]


State = dict[str, SessionState]


def _text(tag: str, size: int = 40) -> str:
    return (tag + "|" + "x" * size)[: max(size, len(tag) + 1)]


SCRIPT: list[Step] = [
    Step("create", "a", title="A"),
    Step("append", "a", (_text("a1"),)),
    Step("append", "a", (_text("a2"), _text("a3"), _text("a4"))),
    Step("create", "b"),
    Step("append", "b", (_text("b1"),)),
    Step("patch", "a", title="A2"),
    # Over WAL_SEGMENT_BYTES: rotation and a checkpoint; b's log passes the compaction threshold.
    Step("append", "b", tuple(_text(f"big{i}", 14_000) for i in range(5))),
    Step("clear", "b"),  # compaction: temp file, fsync, rename, fsync of the directory
    Step("append", "b", (_text("b2"),)),
    Step("create", "c"),
    Step("append", "c", (_text("c1"), _text("c2"), _text("c3"), _text("c4"))),
    Step("append", "c", (_text("c5"),)),
    Step("delete", "c"),
    Step("create", "c", title="again"),  # same id, new incarnation: seqs restart
    Step("append", "c", (_text("c6"),)),
    Step("kill"),  # kill -9 between a's session-log write and the WAL write, then restart
    Step("append", "a", (_text("a5"),)),
    Step("append", "a", (_text("a6"),)),
    Step("append", "b", (_text("b3"),)),
    Step("clear", "a"),
    Step("append", "a", (_text("a7"),)),
    Step("delete", "b"),
    Step("patch", "c", title="C"),
    Step("append", "c", (_text("c7"), _text("c8"))),
    Step("create", "d"),
    Step("append", "d", (_text("d1"),)),
]
SESSION_IDS = sorted({step.sid for step in SCRIPT if step.sid})


def apply(state: State, step: Step) -> State:
    """The state a client may expect once `step` is acknowledged."""
    state = dict(state)
    current = state.get(step.sid)
    if step.kind == "create":
        state[step.sid] = SessionState(1, 0, step.title, ())
    elif step.kind == "delete":
        del state[step.sid]
    else:
        assert current is not None, step
        bumped = replace(current, version=current.version + 1)
        if step.kind == "append":
            added = tuple((current.last_seq + 1 + i, text) for i, text in enumerate(step.contents))
            bumped = replace(bumped, last_seq=current.last_seq + len(added), messages=current.messages + added)
        elif step.kind == "patch":
            bumped = replace(bumped, title=step.title)
        elif step.kind == "clear":
            bumped = replace(bumped, messages=())
        state[step.sid] = bumped
    return state


async def perform(repo: FileSessionRepository, step: Step) -> None:
    if step.kind == "create":
        await repo.create_session(TENANT, SessionCreate(id=step.sid, title=step.title))
    elif step.kind == "append":
        await repo.append_messages(TENANT, step.sid, [MessageCreate(role=Role.user, content=c) for c in step.contents])
    elif step.kind == "patch":
        await repo.patch_session(TENANT, step.sid, SessionPatch(title=step.title))
    elif step.kind == "clear":
        await repo.clear_messages(TENANT, step.sid)
    elif step.kind == "delete":
        await repo.delete_session(TENANT, step.sid)
    else:
        raise AssertionError(step)


async def observe(repo: FileSessionRepository) -> State:
    """Every session of the script as the repository serves it (raises if one cannot be read)."""
    state: State = {}
    for sid in SESSION_IDS:
        session = await repo.get_session(TENANT, sid)
        if session is None:
            continue
        items, more = await repo.list_messages(TENANT, sid, MessageQuery(limit=1000))
        assert not more
        state[sid] = SessionState(
            session.version, session.last_seq, session.title, tuple((m.seq, m.content) for m in items)
        )
    return state


def settings_for(data_dir: Path) -> Settings:
    return Settings.model_validate(
        {"store": "file", "data_dir": data_dir, "fsync": "always", "wal_segment_bytes": WAL_SEGMENT_BYTES}
    )


async def settle(repo: FileSessionRepository) -> None:
    """Wait for a pending rotation and checkpoint, so the sequence of calls is the same on every run."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        writer = repo._writer_task
        if writer is not None and writer.done():
            return
        if repo._checkpoint_task is None and repo._wal_size < WAL_SEGMENT_BYTES:
            return
        await asyncio.sleep(0.001)


async def abandon(repo: FileSessionRepository) -> None:
    """What is left of a process that died: release its files and lock, write nothing."""
    with contextlib.suppress(OSError, ChatSessionsError, TimeoutError):
        await asyncio.wait_for(repo.aclose(), STEP_TIMEOUT)


def wal_write(what: str, path: Path) -> bool:
    return what == "write" and path.parent.name == "wal"


@dataclass
class Run:
    """One run of SCRIPT with a crash at call `crash_at` (None: no crash)."""

    live: Path
    fs: RecordingFileSystem
    allowed: list[State] = field(default_factory=list)  # what recovery may show
    acked: int = 0  # steps acknowledged
    problems: list[str] = field(default_factory=list)


async def run_script(
    work: Path, crash_at: int | None, *, fs_class: type[RecordingFileSystem] = RecordingFileSystem
) -> Run:
    live = work / "live"
    fs = fs_class(live, crash_at=crash_at)
    run = Run(live, fs)
    state: State = {}
    inflight: Step | None = None
    repo: FileSessionRepository | None = None
    try:
        repo = await FileSessionRepository.open(settings_for(live), fs=fs)
        steps = iter(SCRIPT)
        for step in steps:
            if step.kind == "kill":
                victim = next(steps)
                fs.kill_when = wal_write
                try:
                    await asyncio.wait_for(perform(repo, victim), STEP_TIMEOUT)
                except (OSError, ChatSessionsError, TimeoutError):
                    pass
                else:
                    run.problems.append(f"{victim} was acknowledged though its WAL write failed")
                await abandon(repo)
                repo = None
                inflight = victim
                if fs.power_cut:
                    break
                fs.revive()
                repo = await FileSessionRepository.open(settings_for(live), fs=fs)
                # A killed append may or may not be there; whichever it is, it is what later steps build on.
                seen = await observe(repo)
                if seen not in (state, apply(state, victim)):
                    run.problems.append(f"after kill -9 and restart: {describe(seen, [state, apply(state, victim)])}")
                state = seen
                inflight = None
                continue
            try:
                await asyncio.wait_for(perform(repo, step), STEP_TIMEOUT)
            except (OSError, ChatSessionsError, TimeoutError):
                inflight = step
                break
            state = apply(state, step)
            run.acked += 1
            await settle(repo)
    except (OSError, ChatSessionsError):
        if not fs.power_cut:
            raise
    finally:
        if repo is not None:
            await abandon(repo)
    run.allowed = [state] if inflight is None else [state, apply(state, inflight)]
    return run


def describe(seen: State, allowed: list[State]) -> str:
    lines = ["recovered state is none of the allowed ones"]
    for sid in SESSION_IDS:
        options = {repr(option.get(sid)) for option in allowed}
        if repr(seen.get(sid)) not in options:
            lines.append(f"  {sid}: got {seen.get(sid)!r}")
            lines.extend(f"  {sid}: allowed {option}" for option in sorted(options))
    return "\n".join(lines)


def temp_files(image: Path) -> list[str]:
    return sorted(str(p.relative_to(image)) for p in image.rglob("*.tmp"))


async def check_image(image: Path, allowed: list[State], label: str) -> list[str]:
    """Recover from `image` with the real file system and compare with what may be there, twice."""
    problems: list[str] = []
    for attempt in ("recovery", "second recovery"):
        try:
            repo = await FileSessionRepository.open(settings_for(image))
        except Exception as exc:
            return [f"{label}: {attempt} failed: {exc!r}"]
        try:
            seen = await observe(repo)
        except ChatSessionsError as exc:
            problems.append(f"{label}: a session cannot be read after {attempt}: {exc!r}")
            seen = None
        finally:
            await repo.aclose()
        if seen is not None and seen not in allowed:
            problems.append(f"{label}: after {attempt}, {describe(seen, allowed)}")
        leftovers = temp_files(image)
        if leftovers:
            problems.append(f"{label}: temp files left after {attempt}: {leftovers}")
        if problems:
            break
    return problems


@dataclass
class Outcome:
    crash_at: int | None
    calls: int
    acked: int
    problems: list[str]
    trace: list[str]


async def crash_once(
    work: Path,
    crash_at: int | None,
    *,
    torn: random.Random | None = None,
    fs_class: type[RecordingFileSystem] = RecordingFileSystem,
) -> Outcome:
    """Run SCRIPT with a crash at `crash_at`, then check the power-loss image and the kill -9 image."""
    run = await run_script(work, crash_at, fs_class=fs_class)
    fs = run.fs
    label = f"crash at call {crash_at} ({fs.crash_call or 'after the last call'})"
    problems = [f"{label}: {p}" for p in run.problems]
    power = work / "power"
    fs.materialize(power, torn=torn)
    problems += await check_image(power, run.allowed, f"{label}, power loss{' (torn tails)' if torn else ''}")
    killed = work / "killed"
    shutil.copytree(run.live, killed)
    problems += await check_image(killed, run.allowed, f"{label}, kill -9")
    return Outcome(crash_at, fs.calls, run.acked, problems, fs.trace)


async def dry_run(work: Path) -> Outcome:
    """Run SCRIPT once without a power cut: its trace lists the crash points."""
    outcome = await crash_once(work, None)
    if outcome.problems:
        raise AssertionError("\n".join(outcome.problems))
    return outcome


def scratch_parent() -> str | None:
    """A RAM-backed directory when there is one: the runs create and delete thousands of files."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


async def random_iterations(iterations: int, seed: int, progress: bool = False) -> tuple[int, int, list[str]]:
    """`iterations` runs at random crash points, half of them with torn unsynced tails."""
    rng = random.Random(seed)
    problems: list[str] = []
    acked = 0
    with tempfile.TemporaryDirectory(prefix="chatsessions-powerloss-", dir=scratch_parent()) as tmp:
        total = (await dry_run(Path(tmp) / "dry")).calls
        for n in range(iterations):
            work = Path(tmp) / str(n)
            point = rng.randrange(total + 1)
            outcome = await crash_once(work, point, torn=random.Random(rng.getrandbits(32)) if n % 2 else None)
            acked += outcome.acked
            problems += outcome.problems
            shutil.rmtree(work)
            if progress and (n + 1) % 100 == 0:
                print(f"  power loss: {n + 1}/{iterations} iterations, {len(problems)} problems", flush=True)
    return total, acked, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Power-loss simulation at random crash points.")
    parser.add_argument(
        "--iterations", type=int, default=int(os.environ.get("POWERLOSS_ITERATIONS", "1000")), help="default 1000"
    )
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # the store logs every simulated failure; the summary is what counts
    seed = random.randrange(2**32) if args.seed is None else args.seed
    total, acked, problems = asyncio.run(random_iterations(args.iterations, seed, progress=True))
    for problem in problems[:20]:
        print(f"PROBLEM: {problem}")
    print(
        f"power loss: {args.iterations} random crash points of {total} (seed {seed}), "
        f"{acked} acknowledged steps, {len(problems)} problems",
        flush=True,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
