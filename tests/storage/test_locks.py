"""KeyedLocks: the per-session locks of the file store, and the lock-free turn appends take."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from chatsessions.config import Settings
from chatsessions.models import MessageCreate, Role, SessionCreate, SessionPatch
from chatsessions.storage.file import FileSessionRepository
from chatsessions.storage.locks import KeyedLocks

pytestmark = pytest.mark.asyncio


async def test_wait_turn_on_a_free_key_does_not_yield() -> None:
    locks = KeyedLocks()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    await locks.wait_turn("k")
    assert ran == []  # the other task never got to run: nothing was awaited for real
    await task
    assert len(locks) == 0


async def test_wait_turn_waits_for_the_holder_and_those_queued_before() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("k"):
            order.append("holder in")
            await release.wait()
            order.append("holder out")

    async def queued() -> None:
        async with locks.hold("k"):
            order.append("queued")

    async def turn() -> None:
        await locks.wait_turn("k")
        order.append("turn")

    tasks = [asyncio.create_task(holder())]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(queued()), asyncio.create_task(turn())]
    await asyncio.sleep(0.01)
    assert order == ["holder in"]
    release.set()
    await asyncio.gather(*tasks)
    assert order == ["holder in", "holder out", "queued", "turn"]
    assert len(locks) == 0


async def test_an_append_during_a_patch_lands_after_it(tmp_path: Path) -> None:
    repository = await FileSessionRepository.open(Settings(data_dir=tmp_path))
    try:
        await repository.create_session("t", SessionCreate(id="s"))
        patch = asyncio.create_task(repository.patch_session("t", "s", SessionPatch(title="patched")))
        await asyncio.sleep(0)  # the patch holds the session's lock and waits for its fsync
        session, added = await repository.append_messages(
            "t", "s", [MessageCreate(role=Role.user, content="after the patch")]
        )
        patched = await patch
        assert (patched.version, session.version) == (2, 3)
        assert session.title == "patched"
        assert added[0].seq == 1
    finally:
        await repository.aclose()
