"""A full disk and I/O errors, injected where the file store calls the OS, and on a real 2 MiB tmpfs.

What must hold: a failed write answers 507 (ENOSPC) or 503 (EIO) and leaves no
partial or unacknowledged record in a session log or the WAL; the next write
works once the disk is healthy; a failed fsync is never retried and then
acknowledged: the store refuses every write with 503 until restart; after a
restart everything acknowledged is there.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from pydantic_core import from_json

import chatsessions.main
from chatsessions.config import Settings
from chatsessions.errors import StorageFailed, StorageFull, StorageUnavailable
from chatsessions.models import MessageCreate, MessageQuery, Role, SessionCreate, SessionPatch
from chatsessions.storage import records
from chatsessions.storage.base import SessionRepository
from chatsessions.storage.file import FileSessionRepository, split_wal_entry
from chatsessions.storage.records import Kind
from tests.crash.powerloss import RecordingFileSystem

T = "default"
PROBLEM_JSON = "application/problem+json"


@dataclass
class Fault:
    call: str  # write, fsync or unlink
    where: str  # prefix of the path inside the data dir: "s/" (session logs), "wal/"
    error: int
    times: int  # calls left to fail; -1: all of them


class FaultyFileSystem(RecordingFileSystem):
    """Fails chosen calls with an errno; a failing write first writes half its data, as a full disk does.

    It records like `RecordingFileSystem`, so a test can also ask what a power cut would leave.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.faults: list[Fault] = []
        self.hits = 0

    def inject(self, call: str, where: str, error: int, *, times: int = -1) -> None:
        self.faults.append(Fault(call, where, error, times))

    def heal(self) -> None:
        self.faults.clear()

    def _fault(self, call: str, path: Path) -> None:
        with self._lock:
            relative = self._rel(path)
            for fault in self.faults:
                if fault.call == call and relative.startswith(fault.where) and fault.times != 0:
                    fault.times -= 1
                    self.hits += 1
                    raise OSError(fault.error, os.strerror(fault.error), str(path))

    def write(self, fd: int, data: bytes) -> None:
        try:
            self._fault("write", self.path_of(fd))
        except OSError:
            super().write(fd, data[: len(data) // 2])
            raise
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._fault("fsync", self.path_of(fd))
        super().fsync(fd)

    def unlink(self, path: Path) -> None:
        self._fault("unlink", path)
        super().unlink(path)


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    return Settings.model_validate({"store": "file", "data_dir": data_dir, "fsync": "always", **overrides})


def msgs(*texts: str) -> list[MessageCreate]:
    return [MessageCreate(role=Role.user, content=text) for text in texts]


async def history(repo: SessionRepository, session_id: str) -> list[str]:
    items, _ = await repo.list_messages(T, session_id, MessageQuery(limit=1000))
    return [m.content for m in items]


async def snapshot(repo: SessionRepository, ids: list[str]) -> dict[str, tuple[int, list[str]] | None]:
    """Version and history of each session, or None when it does not exist."""
    found: dict[str, tuple[int, list[str]] | None] = {}
    for session_id in ids:
        session = await repo.get_session(T, session_id)
        found[session_id] = None if session is None else (session.version, await history(repo, session_id))
    return found


def message_contents(record: records.Record) -> list[str]:
    return [m["content"] for m in from_json(bytes(record.body))] if record.kind is Kind.MESSAGES else []


def audit(data_dir: Path) -> list[str]:
    """Every message content on disk; each session log and WAL segment must end on a record boundary."""
    found: list[str] = []
    for path in sorted((data_dir / "s").rglob("*.log")):
        data = path.read_bytes()
        recs, end = records.decode(data)
        assert end == len(data), f"{path.name} ends in {len(data) - end} bytes of a partial record"
        for rec in recs:
            found += message_contents(rec)
    for path in sorted((data_dir / "wal").glob("*.wal")):
        data = path.read_bytes()
        frames, end = records.scan_raw(data)
        assert end == len(data), f"{path.name} ends in {len(data) - end} bytes of a partial entry"
        for _, payload in frames:
            _, record, _ = split_wal_entry(payload)
            (rec,), _ = records.decode(record)
            found += message_contents(rec)
    return found


@asynccontextmanager
async def faulty_store(
    data_dir: Path, **overrides: object
) -> AsyncIterator[tuple[FileSessionRepository, FaultyFileSystem]]:
    fs = FaultyFileSystem(data_dir)
    repo = await FileSessionRepository.open(settings_for(data_dir, **overrides), fs=fs)
    try:
        yield repo, fs
    finally:
        await repo.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("where", ["s/", "wal/"], ids=["session-log", "wal"])
@pytest.mark.parametrize(
    ("error", "raised"),
    [(errno.ENOSPC, StorageFull), (errno.EIO, StorageUnavailable)],
    ids=["ENOSPC", "EIO"],
)
async def test_failed_write_leaves_nothing_partial(
    tmp_path: Path, where: str, error: int, raised: type[Exception]
) -> None:
    data = tmp_path / "data"
    ids = ["s1", "s2", "s3"]
    acked: dict[str, list[str]] = {i: [] for i in ids}
    async with faulty_store(data) as (repo, fs):
        for session_id in ids:
            await repo.create_session(T, SessionCreate(id=session_id))
            await repo.append_messages(T, session_id, msgs(f"{session_id}-before"))
            acked[session_id].append(f"{session_id}-before")
        fs.inject("write", where, error)
        # One group commit across three sessions: all of it fails, none of it stays.
        results = await asyncio.gather(
            *(repo.append_messages(T, i, msgs(f"{i}-doomed-a", f"{i}-doomed-b")) for i in ids),
            return_exceptions=True,
        )
        assert fs.hits >= 1
        assert all(isinstance(result, raised) for result in results), results
        assert not any(isinstance(result, StorageFailed) for result in results)
        on_disk = audit(data)
        assert not [text for text in on_disk if "doomed" in text]
        assert sorted(set(on_disk)) == sorted(text for texts in acked.values() for text in texts)
        # The disk has room again: the next write works and seqs continue without a gap.
        fs.heal()
        _, added = await repo.append_messages(T, "s1", msgs("s1-after"))
        acked["s1"].append("s1-after")
        assert added[0].seq == 2
        await repo.check_ready()
    restarted = await FileSessionRepository.open(settings_for(data))
    try:
        for session_id in ids:
            assert await history(restarted, session_id) == acked[session_id]
    finally:
        await restarted.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
async def test_failed_fsync_stops_every_write_until_restart(tmp_path: Path, error: int) -> None:
    data = tmp_path / "data"
    async with faulty_store(data) as (repo, fs):
        await repo.create_session(T, SessionCreate(id="s1"))
        await repo.create_session(T, SessionCreate(id="s2"))
        await repo.append_messages(T, "s1", msgs("kept-1", "kept-2"))
        fs.inject("fsync", "wal/", error, times=1)
        with pytest.raises(StorageFailed):
            await repo.append_messages(T, "s1", msgs("unacknowledged"))
        # The disk answers again, but the pages the failed fsync covered may be gone:
        # the store must not retry and then acknowledge. Every kind of write is refused.
        refused = [
            repo.append_messages(T, "s1", msgs("retry")),
            repo.append_messages(T, "s2", msgs("other", "session")),
            repo.create_session(T, SessionCreate(id="s3")),
            repo.patch_session(T, "s2", SessionPatch(title="no")),
            repo.clear_messages(T, "s1"),
            repo.delete_session(T, "s2"),
        ]
        for attempt in refused:
            with pytest.raises(StorageFailed):
                await attempt
        with pytest.raises(StorageFailed):
            await repo.check_ready()
        assert await history(repo, "s1") == ["kept-1", "kept-2"]  # reads still work
        # What a power cut now would leave holds everything acknowledged.
        fs.materialize(tmp_path / "power")
    for image in (tmp_path / "power", data):
        restarted = await FileSessionRepository.open(settings_for(image))
        try:
            assert (await history(restarted, "s1"))[:2] == ["kept-1", "kept-2"]
            assert await history(restarted, "s2") == []
            assert await restarted.get_session(T, "s3") is None
            await restarted.append_messages(T, "s2", msgs("after restart"))  # writable again
        finally:
            await restarted.aclose()


@pytest.mark.asyncio
async def test_failed_unlink_after_the_commit_does_not_fail_it(tmp_path: Path) -> None:
    """Removing a deleted session's log comes after the WAL fsync: the delete is durable by then."""
    data = tmp_path / "data"
    ids = ["gone", "stays"]
    async with faulty_store(data) as (repo, fs):
        for session_id in ids:
            await repo.create_session(T, SessionCreate(id=session_id))
            await repo.append_messages(T, session_id, msgs(f"{session_id}-1"))
        fs.inject("unlink", "s/", errno.EIO)
        # Same group commit as the delete: an append to another session.
        await asyncio.gather(
            repo.delete_session(T, "gone"),
            repo.append_messages(T, "stays", msgs("stays-2")),
        )
        assert fs.hits == 1
        assert await repo.get_session(T, "gone") is None
        await repo.append_messages(T, "stays", msgs("stays-3"))
        before = await snapshot(repo, ids)
    restarted = await FileSessionRepository.open(settings_for(data))
    try:
        assert await snapshot(restarted, ids) == before
        assert before["stays"] == (4, ["stays-1", "stays-2", "stays-3"])
    finally:
        await restarted.aclose()


async def wait_for_checkpoint(repo: FileSessionRepository) -> None:
    for _ in range(500):
        if repo._checkpoint_task is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the checkpoint did not finish")


@pytest.mark.asyncio
async def test_failed_fsync_at_a_checkpoint_keeps_the_write_ahead_log(tmp_path: Path) -> None:
    """A checkpoint whose fsync of a session log fails must not let a later one drop the WAL that covers it."""
    data = tmp_path / "data"
    acked: dict[str, list[str]] = {"s1": [], "s2": []}
    async with faulty_store(data, wal_segment_bytes=4096) as (repo, fs):
        await repo.create_session(T, SessionCreate(id="s1"))
        await repo.create_session(T, SessionCreate(id="s2"))
        await repo.append_messages(T, "s1", msgs("s1-only-in-the-page-cache"))
        acked["s1"].append("s1-only-in-the-page-cache")
        fs.inject("fsync", "s/", errno.EIO, times=1)
        for i in range(60):  # ~6 KiB of WAL: a rotation and a checkpoint, whose fsync of s1 fails
            try:
                await repo.append_messages(T, "s2", msgs(f"s2-{i:02d}-" + "y" * 100))
            except StorageFailed:
                break
            acked["s2"].append(f"s2-{i:02d}-" + "y" * 100)
            await wait_for_checkpoint(repo)
        assert fs.hits == 1
        fs.heal()
        # Whatever the store does next, a power cut must not lose an acknowledged append.
        for i in range(60):
            try:
                await repo.append_messages(T, "s2", msgs(f"s2-late-{i:02d}-" + "z" * 100))
            except StorageFailed:
                break
            acked["s2"].append(f"s2-late-{i:02d}-" + "z" * 100)
            await wait_for_checkpoint(repo)
        fs.materialize(tmp_path / "power")
        power_image = await FileSessionRepository.open(settings_for(tmp_path / "power"))
        try:
            for session_id, texts in acked.items():
                assert await history(power_image, session_id) == texts
        finally:
            await power_image.aclose()
        with pytest.raises(StorageFailed):  # like a failed WAL fsync: no write until restart
            await repo.append_messages(T, "s1", msgs("refused"))


# --- through the HTTP API ---------------------------------------------------


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = chatsessions.main.create_app(settings)
    async with (
        LifespanManager(app) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(manager.app), base_url="http://test") as client,
    ):
        yield client


def assert_problem(response: httpx.Response, status: int, kind: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status
    assert body["type"].endswith(kind)


def append_body(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


@pytest.mark.asyncio
async def test_http_answers_507_then_503_and_stops_after_a_failed_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    fs = FaultyFileSystem(data)

    async def build_repository(settings: Settings) -> SessionRepository:
        return await FileSessionRepository.open(settings, fs=fs)

    # create_app has no parameter for a file system: its lifespan calls this module-level factory.
    monkeypatch.setattr(chatsessions.main, "build_repository", build_repository)
    async with app_client(settings_for(data)) as client:
        assert (await client.post("/v1/sessions", json={"id": "s1"})).status_code == 201
        assert (await client.post("/v1/sessions/s1/messages", json=append_body("first"))).status_code == 201
        fs.inject("write", "wal/", errno.ENOSPC, times=1)
        assert_problem(await client.post("/v1/sessions/s1/messages", json=append_body("full")), 507, "storage-full")
        ok = await client.post("/v1/sessions/s1/messages", json=append_body("second"))
        assert ok.status_code == 201
        assert ok.json()["seq"] == 2
        fs.inject("fsync", "wal/", errno.EIO, times=1)
        failed = await client.post("/v1/sessions/s1/messages", json=append_body("lost fsync"))
        assert_problem(failed, 503, "storage-unavailable")
        for _ in range(2):  # the disk is fine again; the store still refuses
            again = await client.post("/v1/sessions/s1/messages", json=append_body("retry"))
            assert_problem(again, 503, "storage-unavailable")
        assert_problem(await client.get("/readyz"), 503, "storage-unavailable")
        page = await client.get("/v1/sessions/s1/messages")
        assert [m["content"] for m in page.json()["items"]] == ["first", "second"]
    monkeypatch.undo()
    async with app_client(settings_for(data)) as client:
        page = await client.get("/v1/sessions/s1/messages")
        assert [m["content"] for m in page.json()["items"]][:2] == ["first", "second"]
        assert (await client.post("/v1/sessions/s1/messages", json=append_body("third"))).status_code == 201


# --- a real full disk ---------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, when this machine lets us mount one (root, no sandbox in the way)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, check=False, timeout=10)


@pytest.mark.asyncio
async def test_real_full_disk_answers_507_and_recovers(small_tmpfs: Path) -> None:
    data = small_tmpfs / "data"
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\0" * (256 * 1024))
    acked: list[str] = []
    chunk = "x" * (60 * 1024)
    async with app_client(settings_for(data)) as client:
        assert (await client.post("/v1/sessions", json={"id": "big"})).status_code == 201
        full = None
        for i in range(100):
            text = f"{i:03d}-{chunk}"
            response = await client.post("/v1/sessions/big/messages", json=append_body(text))
            if response.status_code != 201:
                full = response
                break
            acked.append(text)
        assert full is not None, "2 MiB never filled up"
        assert_problem(full, 507, "storage-full")
        assert len(acked) > 5
        on_disk = audit(data)
        assert set(on_disk) == set(acked)
        # Space comes back: the very next append works.
        ballast.unlink()
        response = await client.post("/v1/sessions/big/messages", json=append_body("after"))
        assert response.status_code == 201, response.text
        assert response.json()["seq"] == len(acked) + 1
        acked.append("after")
    async with app_client(settings_for(data)) as client:
        page = await client.get("/v1/sessions/big/messages", params={"limit": 1000})
        assert page.status_code == 200
        assert [m["content"] for m in page.json()["items"]] == acked
