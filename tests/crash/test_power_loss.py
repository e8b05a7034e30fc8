"""Power loss at every crash point of a scripted workload on the SQLite store (see `tests/crash/powerloss.py`)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.crash.powerloss import SCRIPT, crash_once, dry_run, random_concurrent, random_iterations, scratch_parent


@pytest.fixture
def scratch() -> Iterator[Path]:
    """RAM-backed when possible: each crash point creates and deletes a few databases."""
    with tempfile.TemporaryDirectory(prefix="chatsessions-powerloss-", dir=scratch_parent()) as tmp:
        yield Path(tmp)


@pytest.mark.asyncio
async def test_every_crash_point_of_the_script(scratch: Path) -> None:
    dry = await dry_run(scratch / "dry")
    trace = "\n".join(dry.trace)
    # The script must reach what it is there to cover, or the crash points below prove little.
    for needed in (
        "sync chatsessions.db-wal",  # commits
        "write chatsessions.db 4096+4096",  # checkpoints copy pages into the database
        "sync chatsessions.db\n",
        "write chatsessions.db-wal 0+32",  # a WAL (re)started
        "delete chatsessions.db-wal",  # the clean restart removes it
    ):
        assert needed in trace + "\n", needed
    assert dry.acked == len(SCRIPT)
    assert dry.calls > 100
    problems: list[str] = []
    for point in range(dry.calls + 1):
        outcome = await crash_once(scratch / str(point), point)
        problems += outcome.problems
        shutil.rmtree(scratch / str(point))
    assert not problems, f"{len(problems)} problems over {dry.calls + 1} crash points:\n" + "\n".join(problems[:5])


@pytest.mark.asyncio
async def test_the_simulation_catches_commits_no_sync_covered(scratch: Path) -> None:
    """With fsync=never every commit is acknowledged unsynced: kill -9 cannot tell, the power-loss image must."""
    dry = await dry_run(scratch / "dry")
    caught = []
    for point in range(dry.calls // 4, dry.calls, dry.calls // 4):
        outcome = await crash_once(scratch / str(point), point, fsync=False)
        caught += [p for p in outcome.problems if "power loss" in p]
        assert not [p for p in outcome.problems if "kill -9" in p]
        shutil.rmtree(scratch / str(point))
    assert caught


@pytest.mark.asyncio
async def test_random_crash_points_with_random_unsynced_writes_kept() -> None:
    """A few of `make crash`'s runs: half of them keep a random subset of unsynced writes, some torn."""
    totals = await random_iterations(40, seed=20261202)
    assert totals.runs == 40
    assert totals.acked > 0
    assert not totals.problems, "\n".join(totals.problems[:5])


@pytest.mark.asyncio
async def test_group_commits_cut_at_random_points() -> None:
    totals = await random_concurrent(30, seed=7)
    assert totals.runs == 30
    assert totals.acked > 0
    assert not totals.problems, "\n".join(totals.problems[:5])
