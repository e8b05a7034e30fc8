"""A full disk and I/O errors under the SQLite store, injected through SQLite's own seam (`FaultyVFS`).

What must hold: a write the disk refuses answers 507 (ENOSPC) or 503 (EIO),
fails exactly the changes of its commit and leaves nothing of them; reads go
on meanwhile; the next write works once the disk is healthy. A failed sync
is never retried and then acknowledged: the store refuses every write with
503 until restart, and after a restart (or a power cut) everything
acknowledged is there, as after a failed sync of the database file inside
a checkpoint.
"""

from __future__ import annotations

import asyncio
import errno
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

import chatsessions.main
from chatsessions.config import Settings
from chatsessions.errors import StorageFailed, StorageFull, StorageUnavailable
from chatsessions.events import EventSink
from chatsessions.models import MessageCreate, MessageQuery, Role, SessionCreate, SessionPatch
from chatsessions.storage.base import SessionRepository, StoreObserver
from chatsessions.storage.sqlite import SqliteSessionRepository
from chatsessions.storage.sqlite.testvfs import FaultyVFS

T = "default"
PROBLEM_JSON = "application/problem+json"


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    return Settings.model_validate({"store": "sqlite", "data_dir": data_dir, "fsync": "always", **overrides})


def msgs(*texts: str) -> list[MessageCreate]:
    return [MessageCreate(role=Role.user, content=text) for text in texts]


async def history(repo: SessionRepository, session_id: str) -> list[str]:
    items, _ = await repo.list_messages(T, session_id, MessageQuery(limit=1000))
    return [m.text for m in items]


@pytest.fixture
def vfs(tmp_path: Path) -> Iterator[FaultyVFS]:
    with FaultyVFS(root=tmp_path / "data") as faulty:
        yield faulty


@asynccontextmanager
async def faulty_store(data_dir: Path, vfs: FaultyVFS, **overrides: object) -> AsyncIterator[SqliteSessionRepository]:
    repo = await SqliteSessionRepository.open(settings_for(data_dir, **overrides), vfs=vfs.vfs_name)
    try:
        yield repo
    finally:
        await repo.aclose()


@asynccontextmanager
async def plain_store(data_dir: Path) -> AsyncIterator[SqliteSessionRepository]:
    """The store reopened with SQLite's default VFS, as after a restart; it must pass integrity_check."""
    repo = await SqliteSessionRepository.open(settings_for(data_dir))
    try:
        assert await repo.integrity_check() == []
        yield repo
    finally:
        await repo.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("error", "raised"),
    [(errno.ENOSPC, StorageFull), (errno.EIO, StorageUnavailable)],
    ids=["ENOSPC", "EIO"],
)
async def test_a_failed_write_fails_its_commit_and_leaves_nothing(
    tmp_path: Path, vfs: FaultyVFS, error: int, raised: type[Exception]
) -> None:
    data = tmp_path / "data"
    ids = ["s1", "s2", "s3"]
    acked: dict[str, list[str]] = {i: [] for i in ids}
    async with faulty_store(data, vfs) as repo:
        for session_id in ids:
            await repo.create_session(T, SessionCreate(id=session_id))
            await repo.append_messages(T, session_id, msgs(f"{session_id}-before"))
            acked[session_id].append(f"{session_id}-before")
        with vfs.failing("write", error, suffix="-wal") as fault:
            # Queued together: one group commit across three sessions, and all of it fails.
            results = await asyncio.gather(
                *(repo.append_messages(T, i, msgs(f"{i}-doomed-a", f"{i}-doomed-b")) for i in ids),
                repo.create_session(T, SessionCreate(id="doomed")),
                repo.patch_session(T, "s1", SessionPatch(title="doomed")),
                return_exceptions=True,
            )
            assert fault.hits >= 1
            assert all(isinstance(result, raised) for result in results), results
            assert not any(isinstance(result, StorageFailed) for result in results)
            # The disk is still full: reads keep working, and see nothing of the failed commit.
            for session_id in ids:
                assert await history(repo, session_id) == acked[session_id]
            session = await repo.get_session(T, "s1")
            assert session is not None
            assert session.title is None
            assert session.version == 2
            assert await repo.get_session(T, "doomed") is None
            with pytest.raises(raised):  # and writes keep failing, without a lasting refusal
                await repo.append_messages(T, "s2", msgs("s2-doomed-c"))
        # The disk has room again: the next write works and seqs continue without a gap.
        _, added = await repo.append_messages(T, "s1", msgs("s1-after"))
        acked["s1"].append("s1-after")
        assert added[0].seq == 2
        await repo.check_ready()
    async with plain_store(data) as restarted:
        for session_id in ids:
            assert await history(restarted, session_id) == acked[session_id]
        assert await restarted.get_session(T, "doomed") is None


@pytest.mark.asyncio
async def test_a_write_that_names_a_marker_fails_alone(tmp_path: Path, vfs: FaultyVFS) -> None:
    """A fault on the WAL frames holding one message: that commit fails, the ones around it do not."""
    data = tmp_path / "data"
    async with faulty_store(data, vfs) as repo:
        await repo.create_session(T, SessionCreate(id="s1"))
        fault = vfs.inject("write", errno.ENOSPC, marker=b"POISON", times=-1)
        await repo.append_messages(T, "s1", msgs("fine-1"))
        with pytest.raises(StorageFull):
            await repo.append_messages(T, "s1", msgs("POISON"))
        await repo.append_messages(T, "s1", msgs("fine-2"))
        assert fault.hits == 1
        assert await history(repo, "s1") == ["fine-1", "fine-2"]
    async with plain_store(data) as restarted:
        assert await history(restarted, "s1") == ["fine-1", "fine-2"]


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [errno.EIO, errno.ENOSPC], ids=["EIO", "ENOSPC"])
async def test_a_failed_sync_stops_every_write_until_restart(tmp_path: Path, vfs: FaultyVFS, error: int) -> None:
    data = tmp_path / "data"
    async with faulty_store(data, vfs) as repo:
        await repo.create_session(T, SessionCreate(id="s1"))
        await repo.create_session(T, SessionCreate(id="s2"))
        await repo.append_messages(T, "s1", msgs("kept-1", "kept-2"))
        fault = vfs.inject("sync", error, suffix="-wal", times=1)
        with pytest.raises(StorageFailed):
            await repo.append_messages(T, "s1", msgs("unacknowledged"))
        assert fault.hits == 1
        # The disk answers again, but what the failed sync covered may be gone: the store
        # must not retry and then acknowledge. Every kind of write is refused.
        calls_before = vfs.calls
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
        assert vfs.calls == calls_before  # refused before any of them reached the disk
        assert await history(repo, "s1") == ["kept-1", "kept-2"]  # reads still work
        # What a power cut now would leave holds everything acknowledged.
        vfs.materialise(tmp_path / "power")
    for image in (tmp_path / "power", data):
        async with plain_store(image) as restarted:
            # The unacknowledged append may have reached the disk; if so, whole.
            assert (await history(restarted, "s1")) in (["kept-1", "kept-2"], ["kept-1", "kept-2", "unacknowledged"])
            assert await history(restarted, "s2") == []
            assert await restarted.get_session(T, "s3") is None
            await restarted.append_messages(T, "s2", msgs("after restart"))  # writable again


@pytest.mark.asyncio
async def test_a_failed_sync_of_the_database_in_a_checkpoint_loses_nothing(tmp_path: Path, vfs: FaultyVFS) -> None:
    """A checkpoint copies WAL frames into the database file and syncs it; that sync fails.

    The commit that ran the checkpoint was synced in the WAL first. (SQLite ignores a failed
    automatic checkpoint; apsw still raises the test VFS's exception from the COMMIT, so the
    store sees a failed sync and stops writing: more careful than a real disk needs, never less.)
    """
    data = tmp_path / "data"
    acked: list[str] = []
    failed: list[str] = []
    async with faulty_store(data, vfs, wal_segment_bytes=4 * 4096) as repo:
        await repo.create_session(T, SessionCreate(id="s1"))
        for i in range(3):
            await repo.append_messages(T, "s1", msgs(f"early-{i}"))
            acked.append(f"early-{i}")
        fault = vfs.inject("sync", errno.EIO, suffix=".db", times=1)
        for i in range(20):  # ~60 KiB: checkpoints every 16 KiB of WAL, the first fails its sync
            text = f"m{i:02d}-" + "y" * 3000
            try:
                await repo.append_messages(T, "s1", msgs(text))
            except StorageFailed:
                failed.append(text)
                break
            acked.append(text)
        assert fault.hits == 1
        with pytest.raises(StorageFailed):
            await repo.append_messages(T, "s1", msgs("refused"))
        vfs.cut_power()
        vfs.materialise(tmp_path / "power")
    async with plain_store(tmp_path / "power") as restarted:
        assert await history(restarted, "s1") in (acked, acked + failed)


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


async def contents(client: httpx.AsyncClient, session_id: str) -> list[str]:
    page = await client.get(f"/v1/sessions/{session_id}/messages", params={"limit": 1000})
    assert page.status_code == 200, page.text
    return [m["content"] for m in page.json()["items"]]


@pytest.mark.asyncio
async def test_http_answers_507_then_503_and_stops_after_a_failed_sync(
    tmp_path: Path, vfs: FaultyVFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"

    async def build_repository(
        settings: Settings, observer: StoreObserver | None = None, *, sink: EventSink | None = None
    ) -> SessionRepository:
        return await SqliteSessionRepository.open(settings, observer=observer, vfs=vfs.vfs_name, sink=sink)

    # create_app takes no VFS: its lifespan calls this module-level factory, which the test swaps.
    monkeypatch.setattr(chatsessions.main, "build_repository", build_repository)
    async with app_client(settings_for(data)) as client:
        assert (await client.post("/v1/sessions", json={"id": "s1"})).status_code == 201
        assert (await client.post("/v1/sessions/s1/messages", json=append_body("first"))).status_code == 201
        with vfs.failing("write", errno.ENOSPC):
            full = await client.post("/v1/sessions/s1/messages", json=append_body("full"))
            assert_problem(full, 507, "storage-full")
            assert_problem(await client.post("/v1/sessions", json={"id": "s2"}), 507, "storage-full")
            # The disk is full, the service still serves reads.
            assert await contents(client, "s1") == ["first"]
            assert (await client.get("/v1/sessions/s1")).json()["message_count"] == 1
            assert (await client.get("/v1/sessions")).status_code == 200
            assert (await client.get("/healthz")).status_code == 200
        ok = await client.post("/v1/sessions/s1/messages", json=append_body("second"))
        assert ok.status_code == 201, ok.text
        assert ok.json()["seq"] == 2
        vfs.inject("sync", errno.EIO, times=1)
        failed = await client.post("/v1/sessions/s1/messages", json=append_body("lost sync"))
        assert_problem(failed, 503, "storage-unavailable")
        for _ in range(2):  # the disk is fine again; the store still refuses
            again = await client.post("/v1/sessions/s1/messages", json=append_body("retry"))
            assert_problem(again, 503, "storage-unavailable")
        assert_problem(await client.get("/readyz"), 503, "storage-unavailable")
        assert await contents(client, "s1") == ["first", "second"]
    monkeypatch.undo()
    async with app_client(settings_for(data)) as client:
        assert (await contents(client, "s1"))[:2] == ["first", "second"]
        third = await client.post("/v1/sessions/s1/messages", json=append_body("third"))
        assert third.status_code == 201, third.text
        assert (await client.get("/readyz")).status_code == 200


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
async def test_a_real_full_disk_answers_507_and_recovers(small_tmpfs: Path) -> None:
    """No injection: SQLite's unix VFS meets ENOSPC on a 2 MiB tmpfs."""
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
        assert await contents(client, "big") == acked  # reads go on, and see nothing of the failed append
        # Space comes back: the very next append works.
        ballast.unlink()
        response = await client.post("/v1/sessions/big/messages", json=append_body("after"))
        assert response.status_code == 201, response.text
        assert response.json()["seq"] == len(acked) + 1
        acked.append("after")
    async with plain_store(data) as restarted:
        assert await history(restarted, "big") == acked


@pytest.mark.asyncio
async def test_a_keyed_append_that_failed_can_be_retried_and_lands_once(
    tmp_path: Path, vfs: FaultyVFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Idempotency-Key whose append failed (507, or 503 on a failed sync) is free again, never stuck or doubled."""
    data = tmp_path / "data"

    async def build_repository(
        settings: Settings, observer: StoreObserver | None = None, *, sink: EventSink | None = None
    ) -> SessionRepository:
        return await SqliteSessionRepository.open(settings, observer=observer, vfs=vfs.vfs_name, sink=sink)

    monkeypatch.setattr(chatsessions.main, "build_repository", build_repository)
    full_key = {"Idempotency-Key": "full-disk-key"}
    sync_key = {"Idempotency-Key": "failed-sync-key"}
    async with app_client(settings_for(data)) as client:
        assert (await client.post("/v1/sessions", json={"id": "s1"})).status_code == 201
        with vfs.failing("write", errno.ENOSPC):
            refused = await client.post("/v1/sessions/s1/messages", json=append_body("keyed"), headers=full_key)
            assert_problem(refused, 507, "storage-full")
        first = await client.post("/v1/sessions/s1/messages", json=append_body("keyed"), headers=full_key)
        assert first.status_code == 201, first.text
        replay = await client.post("/v1/sessions/s1/messages", json=append_body("keyed"), headers=full_key)
        assert replay.status_code == 201
        assert replay.json() == first.json()
        vfs.inject("sync", errno.EIO, times=1)
        failed = await client.post("/v1/sessions/s1/messages", json=append_body("synced?"), headers=sync_key)
        assert_problem(failed, 503, "storage-unavailable")
    monkeypatch.undo()
    async with app_client(settings_for(data)) as client:
        # The failed sync's commit may or may not have reached the disk; a retry finds its answer or writes it now.
        retry = await client.post("/v1/sessions/s1/messages", json=append_body("synced?"), headers=sync_key)
        assert retry.status_code == 201, retry.text
        again = await client.post("/v1/sessions/s1/messages", json=append_body("synced?"), headers=sync_key)
        assert again.json() == retry.json()
        assert await contents(client, "s1") == ["keyed", "synced?"]
