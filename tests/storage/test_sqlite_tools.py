"""`chatsessions backup` and `chatsessions check` on a live sqlite store."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatsessions.config import Settings
from chatsessions.errors import StorageUnavailable
from chatsessions.models import MessageCreate, MessageQuery, Role, SessionCreate
from chatsessions.storage.sqlite import SqliteSessionRepository
from chatsessions.storage.sqlite.schema import DB_NAME
from chatsessions.storage.sqlite.tools import backup, integrity_check

T = "tenant"


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHATSESSIONS_STORE": "sqlite", "CHATSESSIONS_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "chatsessions.cli", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.asyncio
async def test_a_backup_taken_while_appends_run_is_a_consistent_store(tmp_path: Path) -> None:
    live = await SqliteSessionRepository.open(Settings(data_dir=tmp_path / "live"))
    try:
        await live.create_session(T, SessionCreate(id="s"))
        stop = asyncio.Event()

        async def append_until_stopped() -> int:
            count = 0
            while not stop.is_set():
                await live.append_messages(T, "s", [MessageCreate(role=Role.user, content=f"m{count}")])
                count += 1
            return count

        appender = asyncio.create_task(append_until_stopped())
        await asyncio.sleep(0.2)
        result = await asyncio.to_thread(cli, "backup", str(tmp_path / "copy"), data_dir=tmp_path / "live")
        stop.set()
        appended = await appender
    finally:
        await live.aclose()
    assert result.returncode == 0, result.stderr
    assert "backed up" in result.stdout

    copy = await SqliteSessionRepository.open(Settings(data_dir=tmp_path / "copy"))
    try:
        session = await copy.get_session(T, "s")
        assert session is not None
        items, _ = await copy.list_messages(T, "s", MessageQuery(limit=1000))
        # A snapshot: some prefix of the appends, with counters that agree with it.
        assert 0 < session.last_seq <= appended
        assert [m.content for m in items][: session.last_seq] == [f"m{i}" for i in range(min(session.last_seq, 1000))]
        assert session.message_count == session.last_seq
    finally:
        await copy.aclose()
    assert integrity_check(tmp_path / "copy") == []


def test_backup_refuses_to_overwrite_and_check_names_a_corrupt_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / DB_NAME).write_bytes(b"not a database" * 1000)
    checked = cli("check", data_dir=data)
    assert checked.returncode == 2
    assert str(data / DB_NAME) in checked.stderr
    assert checked.stderr.count("\n") == 1
    assert "Traceback" not in checked.stderr

    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / DB_NAME).write_bytes(b"precious")
    with pytest.raises(StorageUnavailable, match="exists already"):
        backup(data, tmp_path / "dest")
    assert (tmp_path / "dest" / DB_NAME).read_bytes() == b"precious"
