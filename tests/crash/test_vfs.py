"""The test VFS itself, on raw apsw connections (WAL, synchronous=FULL), before anything trusts it."""

from __future__ import annotations

import contextlib
import errno
import random
from collections.abc import Iterator
from pathlib import Path

import apsw
import pytest

from chatsessions.storage.sqlite.testvfs import Call, FaultyVFS

DB = "test.db"


@pytest.fixture
def vfs(tmp_path: Path) -> Iterator[FaultyVFS]:
    with FaultyVFS(root=tmp_path / "live") as faulty:
        (tmp_path / "live").mkdir()
        yield faulty


def connect(path: Path, *, vfs: FaultyVFS | None = None, synchronous: str = "FULL") -> apsw.Connection:
    conn = apsw.Connection(str(path), vfs=vfs.vfs_name if vfs is not None else "")
    # One statement per call: apsw runs a statement list lazily, stopping at the first row it returns.
    assert conn.execute("PRAGMA journal_mode=WAL").fetchall() == [("wal",)]
    conn.execute(f"PRAGMA synchronous={synchronous}")
    return conn


def abandon(conn: apsw.Connection) -> None:
    """Close a connection whose last checkpoint may fail (it is closed all the same)."""
    with contextlib.suppress(apsw.Error):
        conn.close()


def rows(path: Path) -> list[str]:
    """Open an image with the real VFS: it must pass integrity_check; return its rows."""
    conn = apsw.Connection(str(path))
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        tables = conn.execute("SELECT name FROM sqlite_schema WHERE name = 't'").fetchall()
        return [r[0] for r in conn.execute("SELECT x FROM t ORDER BY rowid")] if tables else []
    finally:
        conn.close()


def insert(conn: apsw.Connection, *values: str) -> None:
    with conn:
        for value in values:
            conn.execute("INSERT INTO t(x) VALUES (?)", (value,))


def extended_code(error: apsw.Error) -> int:
    code: int = error.extendedresult  # type: ignore[attr-defined]  # set on every apsw.Error, not in the stubs
    return code


def wal_sync(call: Call) -> bool:
    return call.op == "sync" and call.path.endswith("-wal")


def test_a_commit_survives_a_cut_after_its_sync_and_the_next_one_does_not(vfs: FaultyVFS, tmp_path: Path) -> None:
    live = tmp_path / "live"
    conn = connect(live / DB, vfs=vfs)
    conn.execute("CREATE TABLE t(x TEXT)")
    insert(conn, "a1", "a2")
    syncs = vfs.trace.count("sync test.db-wal")
    assert syncs >= 2  # each commit was synced
    # The power goes at the WAL sync of the next commit: its frames were written, never synced.
    vfs.crash_when = wal_sync
    with pytest.raises(apsw.IOError):
        insert(conn, "b1")
    assert vfs.crash_call == "sync test.db-wal"
    image = vfs.materialise(tmp_path / "power")
    assert "test.db-wal" in image
    assert not any(name.endswith("-shm") for name in image)
    assert rows(tmp_path / "power" / DB) == ["a1", "a2"]
    abandon(conn)  # its checkpoint fails: the machine is off
    # A kill -9 at the same point keeps the page cache: the unsynced commit frame is there.
    assert rows(live / DB) == ["a1", "a2", "b1"]


def test_without_syncs_a_power_cut_keeps_nothing(vfs: FaultyVFS, tmp_path: Path) -> None:
    conn = connect(tmp_path / "live" / DB, vfs=vfs, synchronous="OFF")
    conn.execute("CREATE TABLE t(x TEXT)")
    insert(conn, "a1")
    vfs.cut_power()
    abandon(conn)
    vfs.materialise(tmp_path / "power")
    assert rows(tmp_path / "power" / DB) == []  # the switch to WAL came first, synced


def test_the_crash_point_stops_every_later_call(vfs: FaultyVFS, tmp_path: Path) -> None:
    conn = connect(tmp_path / "live" / DB, vfs=vfs)
    conn.execute("CREATE TABLE t(x TEXT)")
    vfs.crash_at = vfs.calls + 1
    with pytest.raises(apsw.IOError):
        insert(conn, "b1")
    calls = vfs.calls
    with pytest.raises(apsw.Error):  # reads too: the machine is off
        apsw.Connection(str(tmp_path / "live" / DB), vfs=vfs.vfs_name).execute("SELECT * FROM t").fetchall()
    with pytest.raises(apsw.Error):
        insert(conn, "b2")
    assert vfs.calls == calls
    assert vfs.crashed
    abandon(conn)


def test_a_file_exists_on_the_disk_once_synced_and_a_durable_delete_removes_it(vfs: FaultyVFS, tmp_path: Path) -> None:
    path = str(tmp_path / "live" / "plain")
    file = vfs.xOpen(path, [apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_MAIN_DB, 0])
    file.xWrite(b"synced", 0)
    assert vfs.durable_image() == {}
    file.xSync(apsw.SQLITE_SYNC_FULL)
    file.xWrite(b"SYNCED, then lost", 0)
    file.xTruncate(100)
    assert vfs.durable_image() == {"plain": b"synced"}
    file.xClose()
    vfs.xDelete(path, False)
    assert vfs.durable_image() == {"plain": b"synced"}  # the directory was not synced: it may come back
    file = vfs.xOpen(path, [apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_MAIN_DB, 0])
    file.xWrite(b"new", 0)
    file.xSync(apsw.SQLITE_SYNC_FULL)
    file.xClose()
    assert vfs.durable_image() == {"plain": b"new"}
    vfs.xDelete(path, True)
    assert vfs.durable_image() == {}


def test_random_images_keep_a_subset_of_unsynced_writes(vfs: FaultyVFS, tmp_path: Path) -> None:
    path = str(tmp_path / "live" / "plain")
    file = vfs.xOpen(path, [apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_CREATE | apsw.SQLITE_OPEN_MAIN_DB, 0])
    file.xWrite(b"." * 2048, 0)
    file.xSync(apsw.SQLITE_SYNC_FULL)
    file.xWrite(b"A" * 1024, 0)
    file.xWrite(b"B" * 1024, 1024)
    file.xClose()
    seen = {vfs.durable_image(rng=random.Random(seed))["plain"] for seed in range(200)}
    assert b"." * 2048 in seen
    assert b"A" * 1024 + b"B" * 1024 in seen
    assert b"A" * 1024 + b"." * 1024 in seen
    assert b"A" * 512 + b"." * 1536 in seen  # torn at a sector boundary
    assert all(len(image) == 2048 for image in seen)


def raw_crash_points(work: Path, *, synchronous: str, rng: random.Random | None) -> tuple[int, list[str]]:
    """Six commits and checkpoints, cut at every crash point; what each image lacks or has too much."""

    def workload(vfs: FaultyVFS, acked: list[str]) -> None:
        conn = connect(work / "live" / DB, vfs=vfs, synchronous=synchronous)
        try:
            conn.execute("PRAGMA wal_autocheckpoint=4")  # checkpoints (db writes, WAL restarts) inside the run
            conn.execute("CREATE TABLE IF NOT EXISTS t(x TEXT)")
            for n in range(6):
                insert(conn, *(f"r{n}-{i}-" + "p" * 1500 for i in range(n % 3 + 1)))
                acked.append(f"r{n}")
        finally:
            abandon(conn)

    live = work / "live"
    live.mkdir(parents=True)
    with FaultyVFS(root=live) as dry:
        workload(dry, [])
        total = dry.calls
    problems = []
    for point in range(total):
        for stale in live.iterdir():
            stale.unlink()
        acked: list[str] = []
        with FaultyVFS(root=live, crash_at=point) as vfs:
            with contextlib.suppress(apsw.Error):
                workload(vfs, acked)
            assert vfs.crashed
            image = work / f"power-{point}"
            vfs.materialise(image, rng=rng)
        found = sorted({value.split("-")[0] for value in rows(image / DB)}, key=lambda r: int(r[1:]))
        if found[: len(acked)] != acked or len(found) > len(acked) + 1:
            problems.append(f"crash at {point} ({vfs.crash_call}): acknowledged {acked}, found {found}")
    return total, problems


@pytest.mark.parametrize("keep_unsynced", [False, True], ids=["synced-only", "random-unsynced"])
def test_every_crash_point_of_a_raw_workload(tmp_path: Path, keep_unsynced: bool) -> None:
    """At every crash point the image holds every acknowledged commit, and at most the one in flight."""
    total, problems = raw_crash_points(tmp_path, synchronous="FULL", rng=random.Random(5) if keep_unsynced else None)
    assert total > 30
    assert not problems, "\n".join(problems)


def test_the_simulation_catches_commits_that_were_never_synced(tmp_path: Path) -> None:
    """synchronous=OFF acknowledges commits no sync covered: a kill -9 cannot tell, a power cut must."""
    _, problems = raw_crash_points(tmp_path, synchronous="OFF", rng=None)
    assert problems


def test_injected_faults_report_what_the_unix_vfs_would(vfs: FaultyVFS, tmp_path: Path) -> None:
    conn = connect(tmp_path / "live" / DB, vfs=vfs)
    conn.execute("CREATE TABLE t(x TEXT)")
    insert(conn, "kept")
    full = vfs.inject("write", errno.ENOSPC, marker=b"doomed", times=-1)
    insert(conn, "fine")  # no marker in it: not hit
    with pytest.raises(apsw.FullError):
        insert(conn, "doomed")
    with pytest.raises(apsw.FullError):
        insert(conn, "doomed again")
    assert full.hits == 2
    vfs.heal()
    insert(conn, "after")
    vfs.inject("write", errno.EIO, suffix="-wal")
    with pytest.raises(apsw.IOError) as io_error:
        insert(conn, "eio")
    assert extended_code(io_error.value) == apsw.SQLITE_IOERR_WRITE
    insert(conn, "after eio")  # times=1: only that one
    vfs.inject("sync", errno.ENOSPC)
    with pytest.raises(apsw.IOError) as sync_error:
        insert(conn, "unsynced")
    assert extended_code(sync_error.value) == apsw.SQLITE_IOERR_FSYNC
    assert "unsynced" not in rows(tmp_path / "live" / DB)
    conn.close()
    assert rows(tmp_path / "live" / DB) == ["kept", "fine", "after", "after eio"]
