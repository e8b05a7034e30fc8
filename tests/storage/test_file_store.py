"""What only the file store has: restart, crash recovery, torn tails, corruption, the lock."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from chatsessions.config import Settings
from chatsessions.errors import PreconditionFailed, StorageCorrupted, StorageFull, StorageLocked, StorageUnavailable
from chatsessions.models import MessageCreate, MessageQuery, Order, Precondition, Role, SessionCreate, SessionPatch
from chatsessions.storage import records
from chatsessions.storage.file import FileSessionRepository
from chatsessions.storage.sessionlog import scan_log, session_file_name
from chatsessions.storage.vfs import FileSystem

T = "default"


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    return Settings.model_validate({"store": "file", "data_dir": data_dir, **overrides})


@pytest_asyncio.fixture
async def repo(tmp_path: Path) -> AsyncIterator[FileSessionRepository]:
    repository = await FileSessionRepository.open(settings_for(tmp_path / "data"))
    try:
        yield repository
    finally:
        await repository.aclose()


def msg(text: str) -> MessageCreate:
    return MessageCreate(role=Role.user, content=text)


async def contents(repository: FileSessionRepository, session_id: str) -> list[str]:
    items, _ = await repository.list_messages(T, session_id, MessageQuery(limit=1000))
    return [m.content for m in items]


def crash_copy(data_dir: Path, target: Path) -> Path:
    """What a kill -9 leaves: the files as the page cache has them, minus the lock."""
    shutil.copytree(data_dir, target)
    return target


def session_log(data_dir: Path, session_id: str) -> Path:
    name = session_file_name(T, session_id)
    return data_dir / "s" / name[:2] / f"{name}.log"


@pytest.mark.asyncio
async def test_restart_keeps_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await FileSessionRepository.open(settings_for(data))
    await first.create_session(T, SessionCreate(id="s1", title="hello", metadata={"k": [1, 2]}))
    await first.append_messages(T, "s1", [msg(f"m{i}") for i in range(5)])
    await first.patch_session(T, "s1", SessionPatch(title="changed", metadata={"k": None, "n": 1}))
    await first.create_session(T, SessionCreate(id="gone"))
    await first.delete_session(T, "gone")
    before = await first.get_session(T, "s1")
    await first.aclose()

    second = await FileSessionRepository.open(settings_for(data))
    try:
        assert await second.get_session(T, "s1") == before
        assert await second.get_session(T, "gone") is None
        assert await contents(second, "s1") == [f"m{i}" for i in range(5)]
        _, added = await second.append_messages(T, "s1", [msg("next")])
        assert added[0].seq == 6
    finally:
        await second.aclose()


@pytest.mark.asyncio
async def test_crash_replays_the_write_ahead_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    live = await FileSessionRepository.open(settings_for(data))
    try:
        await live.create_session(T, SessionCreate(id="s1"))
        await asyncio.gather(*(live.append_messages(T, "s1", [msg(f"m{i}")]) for i in range(40)))
        await live.clear_messages(T, "s1")
        await live.append_messages(T, "s1", [msg("after clear")])
        expected = await live.get_session(T, "s1")
        copy = crash_copy(data, tmp_path / "crashed")
    finally:
        await live.aclose()
    # The session log is behind the WAL by any amount: cut it back to its first record.
    log_path = session_log(copy, "s1")
    first_record = records.decode(log_path.read_bytes())[0][0]
    os.truncate(log_path, first_record.end)
    recovered = await FileSessionRepository.open(settings_for(copy))
    try:
        assert await recovered.get_session(T, "s1") == expected
        assert await contents(recovered, "s1") == ["after clear"]
    finally:
        await recovered.aclose()


@pytest.mark.asyncio
async def test_torn_session_log_at_every_offset_loads_the_prefix(tmp_path: Path) -> None:
    data = tmp_path / "data"
    live = await FileSessionRepository.open(settings_for(data))
    await live.create_session(T, SessionCreate(id="s1"))
    for i in range(3):
        await live.append_messages(T, "s1", [msg(f"m{i}")])
    await live.aclose()
    log_bytes = session_log(data, "s1").read_bytes()
    ends = [r.end for r in records.decode(log_bytes)[0]]
    for cut in range(ends[0], len(log_bytes)):
        copy = tmp_path / f"cut{cut}"
        shutil.copytree(data, copy)
        # No checkpoint and no WAL: the session log alone is the truth.
        (copy / "catalog.json").unlink()
        shutil.rmtree(copy / "wal")
        os.truncate(session_log(copy, "s1"), cut)
        repository = await FileSessionRepository.open(settings_for(copy))
        try:
            complete = sum(1 for end in ends[1:] if end <= cut)
            assert await contents(repository, "s1") == [f"m{i}" for i in range(complete)]
            session = await repository.get_session(T, "s1")
            assert session is not None
            assert session.version == 1 + complete
        finally:
            await repository.aclose()
        shutil.rmtree(copy)


def test_torn_tail_decodes_to_the_prefix_at_every_offset() -> None:
    frames = [records.encode(records.Kind.MESSAGES, version=i, seq=i, count=1, body=b"x" * i) for i in range(1, 6)]
    log_bytes = b"".join(frames)
    for cut in range(len(log_bytes) + 1):
        recs, end = records.decode(log_bytes[:cut])
        assert [r.version for r in recs] == [i for i in range(1, 6) if sum(map(len, frames[:i])) <= cut]
        assert end == sum(map(len, frames[: len(recs)]))


def test_corruption_in_the_middle_is_reported() -> None:
    frames = [records.encode(records.Kind.MESSAGES, version=i, seq=i, count=1, body=b"y" * 20) for i in range(1, 6)]
    log_bytes = bytearray(b"".join(frames))
    log_bytes[len(frames[0]) + 12] ^= 0x40  # a bit in the second record
    with pytest.raises(records.Corrupted):
        records.decode(bytes(log_bytes))
    assert scan_log(b"") is None


@pytest.mark.asyncio
async def test_corrupt_session_answers_unavailable_not_garbage(tmp_path: Path) -> None:
    data = tmp_path / "data"
    live = await FileSessionRepository.open(settings_for(data))
    await live.create_session(T, SessionCreate(id="s1"))
    await live.create_session(T, SessionCreate(id="s2"))
    for i in range(4):
        await live.append_messages(T, "s1", [msg(f"m{i}")])
    await live.append_messages(T, "s2", [msg("fine")])
    await live.aclose()
    path = session_log(data, "s1")
    raw = bytearray(path.read_bytes())
    second = records.decode(bytes(raw))[0][1]
    raw[second.offset + 20] ^= 0x01
    path.write_bytes(bytes(raw))
    repository = await FileSessionRepository.open(settings_for(data))
    try:
        with pytest.raises(StorageCorrupted):
            await repository.list_messages(T, "s1", MessageQuery())
        with pytest.raises(StorageCorrupted):
            await repository.append_messages(T, "s1", [msg("more")])
        assert await contents(repository, "s2") == ["fine"]
    finally:
        await repository.aclose()


@pytest.mark.asyncio
async def test_second_open_of_a_data_dir_is_refused(repo: FileSessionRepository, tmp_path: Path) -> None:
    with pytest.raises(StorageLocked, match="locked by another chatsessions process"):
        await FileSessionRepository.open(settings_for(tmp_path / "data"))


class CountingFileSystem(FileSystem):
    def __init__(self) -> None:
        self.reads = 0

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        self.reads += 1
        return super().pread(fd, size, offset)

    def read_file(self, path: Path) -> bytes:
        self.reads += 1
        return super().read_file(path)


@pytest.mark.asyncio
async def test_append_never_reads_history(tmp_path: Path) -> None:
    fs = CountingFileSystem()
    repository = await FileSessionRepository.open(settings_for(tmp_path / "data"), fs=fs)
    try:
        await repository.create_session(T, SessionCreate(id="s1"))
        await repository.append_messages(T, "s1", [msg(f"m{i}") for i in range(100)])
        fs.reads = 0
        for i in range(50):
            await repository.append_messages(T, "s1", [msg(f"n{i}")])
        assert fs.reads == 0
        # Once indexed, the newest messages come from memory, and appends keep them there;
        # older ones cost one read of exactly their bytes.
        await repository.list_messages(T, "s1", MessageQuery(limit=5, order=Order.desc))
        await repository.append_messages(T, "s1", [msg("newest")])
        fs.reads = 0
        items, more = await repository.list_messages(T, "s1", MessageQuery(limit=5, order=Order.desc))
        assert [m.seq for m in items] == [151, 150, 149, 148, 147]
        assert items[0].content == "newest"
        assert more
        assert fs.reads == 0
        items, _ = await repository.list_messages(T, "s1", MessageQuery(limit=3))
        assert [m.content for m in items] == ["m0", "m1", "m2"]
        assert fs.reads == 1
    finally:
        await repository.aclose()


@pytest.mark.asyncio
async def test_cache_stays_within_its_bounds(tmp_path: Path) -> None:
    repository = await FileSessionRepository.open(settings_for(tmp_path / "data", cache_sessions=5))
    try:
        for i in range(20):
            await repository.create_session(T, SessionCreate(id=f"s{i}"))
            await repository.append_messages(T, f"s{i}", [msg("x")])
            await repository.list_messages(T, f"s{i}", MessageQuery())
        assert repository.stats()["cached"] == 5
        assert await contents(repository, "s0") == ["x"]  # evicted, reloaded on demand
        assert repository.stats()["locks"] == 0
    finally:
        await repository.aclose()


@pytest.mark.asyncio
async def test_checkpoints_rotate_the_write_ahead_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    repository = await FileSessionRepository.open(settings_for(data, wal_segment_bytes=4096))
    await repository.create_session(T, SessionCreate(id="s1"))
    for i in range(200):
        await repository.append_messages(T, "s1", [msg(f"m{i:03d}" + "z" * 50)])
    await asyncio.sleep(0.1)
    segments = os.listdir(data / "wal")
    await repository.aclose()
    assert len(segments) <= 2
    reopened = await FileSessionRepository.open(settings_for(data))
    try:
        assert len(await contents(reopened, "s1")) == 200
    finally:
        await reopened.aclose()


@pytest.mark.asyncio
async def test_file_names_stay_inside_the_data_dir(repo: FileSessionRepository, tmp_path: Path) -> None:
    for tricky in ["CON", "con", "Con", "a-b_c", "x" * 128]:
        await repo.create_session(T, SessionCreate(id=tricky))
    names = {session_file_name(T, s) for s in ["CON", "con", "Con"]}
    assert len(names) == 3
    assert all(name == name.lower() and len(name) == 32 for name in names)
    for path in (tmp_path / "data").rglob("*"):
        assert path.resolve().is_relative_to((tmp_path / "data").resolve())


class FailOnMarker(FileSystem):
    """ENOSPC for the first write that carries `marker`: a full disk mid-pipeline."""

    def __init__(self, marker: bytes) -> None:
        self.marker = marker
        self.tripped = False

    def write(self, fd: int, data: bytes) -> None:
        if not self.tripped and self.marker in data:
            self.tripped = True
            raise OSError(errno.ENOSPC, "No space left on device")
        super().write(fd, data)


@pytest.mark.asyncio
async def test_a_failed_append_fences_the_appends_queued_behind_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    repository = await FileSessionRepository.open(settings_for(data), fs=FailOnMarker(b"BOOM"))
    try:
        await repository.create_session(T, SessionCreate(id="s1"))
        texts = [f"m{i}" if i != 7 else "BOOM" for i in range(30)]
        outcomes = await asyncio.gather(
            *(repository.append_messages(T, "s1", [msg(text)]) for text in texts), return_exceptions=True
        )
        acked = [
            (outcome[1][0].seq, text)
            for text, outcome in zip(texts, outcomes, strict=True)
            if not isinstance(outcome, BaseException)
        ]
        failed = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        assert any(isinstance(f, StorageFull) for f in failed)
        assert all(isinstance(f, StorageFull | StorageUnavailable) for f in failed)
        assert "BOOM" not in [text for _, text in acked]
        # What was acknowledged is exactly what is there, with contiguous seqs.
        assert [seq for seq, _ in acked] == list(range(1, len(acked) + 1))
        assert await contents(repository, "s1") == [text for _, text in acked]
        _, added = await repository.append_messages(T, "s1", [msg("after")])
        assert added[0].seq == len(acked) + 1
    finally:
        await repository.aclose()
    reopened = await FileSessionRepository.open(settings_for(data))
    try:
        assert await contents(reopened, "s1") == [*(text for _, text in acked), "after"]
    finally:
        await reopened.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("seed", range(4))
async def test_reads_racing_appends_and_patches_see_a_consistent_log(tmp_path: Path, seed: int) -> None:
    """A read works on what was durable when it began: appends queued before it take effect while
    its thread reads, and must not move the log under it (that read as corruption and quarantined
    a healthy session)."""
    rnd = random.Random(seed)
    repository = await FileSessionRepository.open(settings_for(tmp_path))
    try:
        await repository.create_session("t", SessionCreate(id="s"))
        pages: list[list[int]] = []

        async def one(i: int) -> None:
            await asyncio.sleep(rnd.random() * 0.02)
            pick = rnd.random()
            if pick < 0.6:
                if_match = None
                if rnd.random() < 0.3:
                    current = await repository.get_session("t", "s")
                    assert current is not None
                    if_match = Precondition(versions=frozenset({current.version}))
                with contextlib.suppress(PreconditionFailed):
                    await repository.append_messages("t", "s", [msg(f"m{i}")] * rnd.randint(1, 3), if_match=if_match)
            elif pick < 0.75:
                await repository.patch_session("t", "s", SessionPatch(title=f"p{i}"))
            else:
                found, _ = await repository.list_messages("t", "s", MessageQuery(limit=100))
                pages.append([m.seq for m in found])

        await asyncio.gather(*(one(i) for i in range(300)))
        session = await repository.get_session("t", "s")
        assert session is not None
        everything, _ = await repository.list_messages("t", "s", MessageQuery(limit=1000))
        assert [m.seq for m in everything] == list(range(1, session.last_seq + 1))
        assert all(page == list(range(1, len(page) + 1)) for page in pages), pages
    finally:
        await repository.aclose()


class GatedFileSystem(FileSystem):
    """Holds the next fsync, or the next pread, until the test lets it go (threads wait, not the loop)."""

    def __init__(self) -> None:
        self.hold_fsync = self.hold_pread = False
        self.in_fsync, self.in_pread = threading.Event(), threading.Event()
        self.fsync_go, self.pread_go = threading.Event(), threading.Event()

    def fsync(self, fd: int) -> None:
        if self.hold_fsync:
            self.hold_fsync = False
            self.in_fsync.set()
            self.fsync_go.wait(10)
        super().fsync(fd)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if self.hold_pread:
            self.hold_pread = False
            self.in_pread.set()
            self.pread_go.wait(10)
        return super().pread(fd, size, offset)


@pytest.mark.asyncio
async def test_an_append_applied_while_a_read_is_on_disk_is_read_next_time(tmp_path: Path) -> None:
    fs = GatedFileSystem()
    repository = await FileSessionRepository.open(settings_for(tmp_path), fs=fs)
    try:
        await repository.create_session("t", SessionCreate(id="s"))
        await repository.append_messages("t", "s", [msg("a"), msg("b")])
        await repository.list_messages("t", "s", MessageQuery())  # caches the index
        await repository.patch_session("t", "s", SessionPatch(title="moves the log past the index"))

        fs.hold_fsync = True
        append = asyncio.create_task(repository.append_messages("t", "s", [msg("c")]))
        assert await asyncio.to_thread(fs.in_fsync.wait, 10)  # queued, not yet applied
        fs.hold_pread = True
        read = asyncio.create_task(repository.list_messages("t", "s", MessageQuery()))
        assert await asyncio.to_thread(fs.in_pread.wait, 10)  # the read's thread is on disk
        fs.fsync_go.set()
        await append  # applied while the read is still reading
        fs.pread_go.set()

        first, _ = await read
        assert [m.content for m in first] == ["a", "b"]  # what was there when the read began
        again, _ = await repository.list_messages("t", "s", MessageQuery())
        assert [m.content for m in again] == ["a", "b", "c"]
        assert (await repository.get_message("t", "s", 3)).content == "c"
    finally:
        fs.fsync_go.set()
        fs.pread_go.set()
        await repository.aclose()
