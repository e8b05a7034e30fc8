"""kill -9 of the real server under load, 10 short cycles (`make crash` runs 100 or more)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crash.harness import run_cycles


@pytest.mark.asyncio
async def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    # Shorter kill windows than `make crash` (50-2000 ms) keep this under a minute.
    totals = await run_cycles(cycles=10, work_dir=tmp_path, kill_window=(0.05, 0.6))
    assert totals.ok, totals.summary() + "\n" + totals.details()
    assert totals.cycles == 10
    assert totals.acknowledged > 0
    assert totals.ops["append"] > 0
    assert totals.summary() == f"crash: 10 cycles, {totals.acknowledged} acknowledged, 0 lost, 0 unreadable"
