"""What only the embedded SQLite store has: its file, its lock, its writer thread, its pragmas.

The behaviour every backend shares is in `test_contract.py`; crashes and injected
faults are in `tests/crash/`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import apsw
import pytest
import pytest_asyncio

from chatsessions.config import Settings
from chatsessions.errors import StorageCorrupted, StorageFull, StorageIncompatible, StorageLocked
from chatsessions.models import (
    IdempotencyRequest,
    Message,
    MessageCreate,
    MessageQuery,
    Role,
    Session,
    SessionCreate,
    StoredResponse,
)
from chatsessions.storage.sqlite import SqliteSessionRepository
from chatsessions.storage.sqlite.schema import DB_NAME, MIGRATIONS
from chatsessions.storage.sqlite.writer import Tx

pytestmark = pytest.mark.asyncio

T = "tenant"


def settings_for(data_dir: Path, **overrides: object) -> Settings:
    return Settings.model_validate({"store": "sqlite", "data_dir": data_dir, **overrides})


def user(text: str) -> list[MessageCreate]:
    return [MessageCreate(role=Role.user, content=text)]


@pytest_asyncio.fixture
async def repo(tmp_path: Path) -> AsyncIterator[SqliteSessionRepository]:
    repository = await SqliteSessionRepository.open(settings_for(tmp_path / "data"))
    try:
        yield repository
    finally:
        await repository.aclose()


class Recorder:
    """A StoreObserver that remembers what it was told (from the writer thread)."""

    def __init__(self) -> None:
        self.commits: list[int] = []
        self.lock = threading.Lock()

    def commit(self, *, changes: int, seconds: float) -> None:
        with self.lock:
            self.commits.append(changes)

    def queue_depth(self, depth: int) -> None:
        pass

    def cache(self, *, hit: bool) -> None:
        pass


class Gate:
    """A change that holds the writer thread until `open()`: what queues behind it forms one batch."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, tx: Tx) -> None:
        self.entered.set()
        self.release.wait(timeout=30)

    async def hold(self, repository: SqliteSessionRepository) -> asyncio.Future[None]:
        held = repository._writer.submit(self)
        await asyncio.to_thread(self.entered.wait, 30)
        return held


async def test_everything_survives_a_reopen(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await SqliteSessionRepository.open(settings_for(data))
    await first.create_session(T, SessionCreate(id="s", title="kept"))
    await first.append_messages(T, "s", user("one") + user("two"))
    await first.aclose()

    second = await SqliteSessionRepository.open(settings_for(data))
    try:
        session = await second.get_session(T, "s")
        assert session is not None
        assert (session.title, session.message_count, session.last_seq, session.version) == ("kept", 2, 2, 2)
        items, more = await second.list_messages(T, "s", MessageQuery())
        assert [m.content for m in items] == ["one", "two"]
        assert not more
    finally:
        await second.aclose()
    assert sorted(p.name for p in data.iterdir()) == ["LOCK", DB_NAME]  # the WAL is folded in on close


async def test_a_second_open_of_the_data_dir_is_refused(repo: SqliteSessionRepository, tmp_path: Path) -> None:
    with pytest.raises(StorageLocked, match="locked by another chatsessions process"):
        await SqliteSessionRepository.open(settings_for(tmp_path / "data"))


async def test_the_lock_is_released_when_a_start_fails(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(b"this is not a database, only text that pretends to be one" * 100)
    with pytest.raises(StorageCorrupted) as caught:
        await SqliteSessionRepository.open(settings_for(data))
    message = str(caught.value)
    assert str(data / DB_NAME) in message
    assert "\n" not in message
    (data / DB_NAME).unlink()
    repository = await SqliteSessionRepository.open(settings_for(data))  # not StorageLocked
    await repository.aclose()


async def test_a_data_dir_of_the_old_file_store_is_refused_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "wal").mkdir(parents=True)
    (data / "catalog.json").write_text("{}")
    with pytest.raises(StorageIncompatible) as caught:
        await SqliteSessionRepository.open(settings_for(data))
    assert "0.1 file store" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (data / DB_NAME).exists()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    conn = apsw.Connection(str(data / DB_NAME))
    conn.pragma("user_version", len(MIGRATIONS) + 1)
    conn.close()
    with pytest.raises(StorageIncompatible, match="newer than this release"):
        await SqliteSessionRepository.open(settings_for(data))


async def test_schema_version_and_pragmas(tmp_path: Path) -> None:
    for fsync, synchronous in (("always", 2), ("never", 0)):
        data = tmp_path / fsync
        repository = await SqliteSessionRepository.open(settings_for(data, fsync=fsync))
        try:

            def pragmas(tx: Tx) -> tuple[object, ...]:
                return tuple(tx.conn.pragma(name) for name in ("journal_mode", "synchronous", "secure_delete"))

            assert await repository._writer.submit(pragmas) == ("wal", synchronous, 1)
        finally:
            await repository.aclose()
        conn = apsw.Connection(str(data / DB_NAME))
        assert conn.pragma("user_version") == len(MIGRATIONS)
        conn.close()


async def test_concurrent_changes_share_commits(tmp_path: Path) -> None:
    recorder = Recorder()
    repository = await SqliteSessionRepository.open(settings_for(tmp_path / "data"), observer=recorder)
    try:
        await asyncio.gather(*(repository.create_session(T, SessionCreate(id=f"s{i}")) for i in range(8)))
        gate = Gate()
        held = await gate.hold(repository)
        appends = [repository.append_messages(T, f"s{i % 8}", user(f"m{i}")) for i in range(200)]
        pending = asyncio.gather(*appends)
        await asyncio.sleep(0)  # every append is queued behind the gate
        gate.release.set()
        await held
        results = await pending
    finally:
        await repository.aclose()
    assert len(results) == 200
    with recorder.lock:
        commits = list(recorder.commits)
    assert sum(commits) >= 200 + 8 + 1
    assert max(commits) >= 100, commits  # the queued appends went into a few large transactions


async def test_a_failed_commit_fails_exactly_its_batch_and_reserves_nothing(repo: SqliteSessionRepository) -> None:
    await repo.create_session(T, SessionCreate(id="s"))
    await repo.append_messages(T, "s", user("before"))

    def disk_full(tx: Tx) -> None:
        raise apsw.FullError("database or disk is full")

    gate = Gate()
    held = await gate.hold(repo)
    doomed: list[asyncio.Future[Any]] = [
        asyncio.ensure_future(repo.append_messages(T, "s", user("lost-1"))),
        asyncio.ensure_future(repo._writer.submit(disk_full)),
        asyncio.ensure_future(repo.append_messages(T, "s", user("lost-2"))),
    ]
    await asyncio.sleep(0)
    gate.release.set()
    await held  # the gate ran alone; what queued behind it is the next batch
    for future in doomed:
        with pytest.raises(StorageFull):
            await future

    session, added = await repo.append_messages(T, "s", user("after"))
    assert [m.seq for m in added] == [2]  # no seq was used up by the failed batch
    assert (session.version, session.message_count) == (3, 2)
    items, _ = await repo.list_messages(T, "s", MessageQuery())
    assert [m.content for m in items] == ["before", "after"]


async def test_reads_do_not_wait_for_the_writer(repo: SqliteSessionRepository) -> None:
    await repo.create_session(T, SessionCreate(id="s"))
    await repo.append_messages(T, "s", user("committed"))
    gate = Gate()
    held = await gate.hold(repo)
    try:
        queued = asyncio.ensure_future(repo.append_messages(T, "s", user("queued")))
        session = await asyncio.wait_for(repo.get_session(T, "s"), timeout=10)
        items, _ = await asyncio.wait_for(repo.list_messages(T, "s", MessageQuery()), timeout=10)
        assert session is not None
        assert session.message_count == 1
        assert [m.content for m in items] == ["committed"]
        assert not queued.done()
    finally:
        gate.release.set()
    await held
    await queued
    items, _ = await repo.list_messages(T, "s", MessageQuery())
    assert [m.content for m in items] == ["committed", "queued"]


def render(session: Session, messages: list[Message]) -> StoredResponse:
    return StoredResponse(201, f'{{"version":{session.version}}}'.encode(), {"ETag": session.etag})


async def test_stored_answers_live_on_disk_and_expire(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = await SqliteSessionRepository.open(settings_for(data, idempotency_ttl_seconds=1))
    await first.create_session(T, SessionCreate(id="s"))
    assert await first.idempotency_begin(T, "k", "fp") is None
    await first.append_messages(T, "s", user("x"), idempotency=IdempotencyRequest("k", "fp", render))
    await first.aclose()

    second = await SqliteSessionRepository.open(settings_for(data, idempotency_ttl_seconds=1))
    try:
        replay = await second.idempotency_begin(T, "k", "fp")
        assert replay == StoredResponse(201, b'{"version":2}', {"ETag": '"2"'})
        await asyncio.sleep(1.1)
        assert await second.purge_expired_answers() == 1
        assert await second.idempotency_begin(T, "k", "fp") is None  # expired: the key is free again
    finally:
        await second.aclose()


async def test_the_head_cache_stays_bounded(tmp_path: Path) -> None:
    repository = await SqliteSessionRepository.open(settings_for(tmp_path / "data", cache_sessions=5))
    try:
        for i in range(20):
            await repository.create_session(T, SessionCreate(id=f"s{i}"))
        for round_ in range(3):
            for i in range(20):
                session, _ = await repository.append_messages(T, f"s{i}", user(f"r{round_}"))
                assert session.last_seq == round_ + 1
        assert len(repository._writer._heads) == 5
    finally:
        await repository.aclose()


async def test_the_head_cache_stays_within_its_bytes(tmp_path: Path) -> None:
    repository = await SqliteSessionRepository.open(settings_for(tmp_path / "data", cache_bytes=20_000))
    try:
        for i in range(30):
            await repository.create_session(T, SessionCreate(id=f"s{i}", metadata={"blob": "x" * 3000}))
            session, _ = await repository.append_messages(T, f"s{i}", user("hi"))
            assert session.metadata == {"blob": "x" * 3000}
        heads = repository._writer._heads
        assert 0 < heads.bytes <= 20_000
        assert len(heads) < 30
        for i in range(30):  # evicted heads come back from the database, intact
            session, _ = await repository.append_messages(T, f"s{i}", user("again"))
            assert (session.last_seq, session.metadata) == (2, {"blob": "x" * 3000})
    finally:
        await repository.aclose()


async def test_the_memory_store_is_private_and_gone_after_close() -> None:
    memory = Settings.model_validate({"store": "memory"})
    one = await SqliteSessionRepository.open(memory)
    two = await SqliteSessionRepository.open(memory)
    try:
        await one.create_session(T, SessionCreate(id="s"))
        assert await two.get_session(T, "s") is None
    finally:
        await one.aclose()
        await two.aclose()
    again = await SqliteSessionRepository.open(memory)
    try:
        assert await again.get_session(T, "s") is None
    finally:
        await again.aclose()


async def test_integrity_check_reports_a_healthy_file(repo: SqliteSessionRepository) -> None:
    await repo.create_session(T, SessionCreate(id="s"))
    assert await repo.integrity_check() == []
