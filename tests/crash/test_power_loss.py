"""Power loss at every crash point of a scripted workload (see `tests/crash/powerloss.py`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crash.powerloss import (
    PowerCut,
    RecordingFileSystem,
    crash_once,
    dry_run,
    scratch_parent,
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """RAM-backed when possible: each crash point creates and deletes a few data directories."""
    with tempfile.TemporaryDirectory(prefix="chatsessions-powerloss-", dir=scratch_parent()) as tmp:
        yield Path(tmp)


def read_image(fs: RecordingFileSystem, target: Path) -> dict[str, bytes]:
    fs.materialize(target)
    return {str(p.relative_to(target)): p.read_bytes() for p in sorted(target.rglob("*")) if p.is_file()}


def test_the_model_drops_what_no_fsync_covered(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    fs = RecordingFileSystem(root)
    fs.mkdir(root / "d")
    fs.fsync_dir(root)
    fd = fs.open(root / "d" / "kept", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    fs.write(fd, b"synced")
    fs.fsync(fd)
    fs.write(fd, b" lost")
    fs.close(fd)
    assert read_image(fs, tmp_path / "a") == {}  # the creation is not durable until d is fsynced
    fs.fsync_dir(root / "d")
    assert read_image(fs, tmp_path / "b") == {"d/kept": b"synced"}
    fs.rename(root / "d" / "kept", root / "d" / "moved")
    fs.unlink(root / "d" / "moved")
    assert read_image(fs, tmp_path / "c") == {"d/kept": b"synced"}  # neither reached the directory
    fs.fsync_dir(root / "d")
    assert read_image(fs, tmp_path / "d") == {}
    assert list((root / "d").iterdir()) == []  # the live directory saw every call


def test_the_crash_point_stops_every_later_call(tmp_path: Path) -> None:
    fs = RecordingFileSystem(tmp_path / "disk", crash_at=1)
    fs.mkdir(tmp_path / "disk" / "a")
    with pytest.raises(PowerCut):
        fs.mkdir(tmp_path / "disk" / "b")
    with pytest.raises(PowerCut):
        fs.exists(tmp_path / "disk" / "a")
    assert fs.calls == 1
    assert fs.crash_call == "mkdir b"


@pytest.mark.asyncio
async def test_every_crash_point_of_the_script(scratch: Path) -> None:
    dry = await dry_run(scratch / "dry")
    trace = "\n".join(dry.trace)
    # The script must reach what it is there to cover, or the crash points below prove little.
    for needed in ("rename catalog.json.tmp", ".log.tmp", "unlink wal/", "create wal/000000000002.wal"):
        assert needed in trace, needed
    assert dry.acked >= 20
    problems: list[str] = []
    for point in range(dry.calls + 1):
        outcome = await crash_once(scratch / str(point), point)
        problems += outcome.problems
        shutil.rmtree(scratch / str(point))
    assert not problems, f"{len(problems)} problems over {dry.calls + 1} crash points:\n" + "\n".join(problems[:5])


class WalFsyncIsALie(RecordingFileSystem):
    """A store bug on purpose: the WAL fsync returns without making anything durable."""

    def fsync(self, fd: int) -> None:
        if self.path_of(fd).parent.name == "wal":
            self._record("fsync", self.path_of(fd))
            return
        super().fsync(fd)


@pytest.mark.asyncio
async def test_the_simulation_catches_a_missing_fsync(scratch: Path) -> None:
    """kill -9 cannot see a missing fsync; the power-loss image must."""
    dry = await dry_run(scratch / "dry")
    caught = []
    for point in range(10, dry.calls, 10):
        outcome = await crash_once(scratch / str(point), point, fs_class=WalFsyncIsALie)
        caught += [p for p in outcome.problems if "power loss" in p]
        assert not [p for p in outcome.problems if "kill -9" in p]
        shutil.rmtree(scratch / str(point))
    assert caught
